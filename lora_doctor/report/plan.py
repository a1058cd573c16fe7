"""`plan` rendering: the data dict from commands/plan.gather_plan -> terminal text or GitHub Markdown.

The only place plan's bytes become "GiB" strings. Imports no torch.
"""

from __future__ import annotations

from tabulate import tabulate

from ..budget import TERMS
from . import format_bytes, format_count
from .dataplan import data_lines, data_markdown

# budget.py is pure arithmetic (no torch), so the one list of terms and labels lives there.
TERM_LABELS = TERMS
STATUS_MARK = {"fits": "✓", "tight": "⚠", "does not fit": "✗"}


def peft_line(count: dict) -> str:
    """Exactly peft's print_trainable_parameters() line."""
    return (f"trainable params: {count['trainable_params']:,d} || all params: {count['all_params']:,d} || "
            f"trainable%: {100 * count['trainable_params'] / count['all_params']:.4f}")


def _alpha(data: dict) -> str:
    lora = data["lora"]
    if lora.get("alpha") is None and len(data.get("trainable", [])) > 1:
        return "2×r"  # a sweep: every rank gets its own default alpha
    return str(lora["lora_alpha"])


def _step_line(data: dict) -> str:
    t, q, lora = data["train"], data["quant"], data["lora"]
    quant = "none (bf16 base)" if q["mode"] is None else q["mode"] + (" + double quant" if q["double_quant"] else "")
    d = data.get("data")
    basis = f" (the longest {d['runs']} batch of --data)" if d else ""
    return (f"batch {t['batch']} × seq {t['seq_len']}{basis}, gradient checkpointing {'on' if t['grad_ckpt'] else 'off'}, "
            f"attention {t['attn_impl']}, optimizer {t['optim']}, quantization {quant}, "
            f"lora_alpha {_alpha(data)}, dropout {lora['dropout']}" + (", DoRA" if lora["use_dora"] else "")
            + (f", stack {data['stack']}" if data.get("stack") else ""))


COLLECTIVE_LABELS = {"ddp": "DDP gradient buckets", "fsdp": "FSDP all-gather / reduce-scatter"}
"""Row label of a multi-GPU plan's collective_buffers_bytes (sharding.PerGpuBudget), by strategy."""


def parallel_words(data: dict) -> str:
    """'' for a one-GPU plan, else ' per GPU (2 × RTX 4090, fsdp)'-style words for headings."""
    p = data.get("parallel")
    if not p:
        return ""
    card = f" × {data['gpu']['name']}" if data.get("gpu") else " GPUs"
    return f" per GPU ({p['gpus']}{card}, {p['strategy']})"


def memory_rows(budget: dict) -> tuple[list[str], list[list[str]]]:
    methods = budget["methods"]
    headers = ["term"] + [m["label"] + (" *" if m["key"] == budget["primary"] else "") for m in methods]
    terms = list(TERM_LABELS)
    if "collective_buffers_bytes" in methods[0]:  # a multi-GPU plan: its own row, before runtime overhead
        terms.insert(-1, ("collective_buffers_bytes", COLLECTIVE_LABELS[methods[0]["strategy"]]))
    rows = [[label] + [format_bytes(m[field]) for m in methods] for field, label in terms]
    rows.append(["total"] + [format_bytes(m["total_bytes"]) for m in methods])
    return headers, rows


def _verdict_cell(v: dict) -> str:
    return f"{STATUS_MARK[v['status']]} {v['status']} ({100 * v['fraction']:.0f}%)"


def verdict_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    budget = data["budgets"][0]
    headers = ["GPU", "usable"] + [m["label"] for m in budget["methods"]]
    rows = []
    for g in data["gpus"]:
        name = g["name"] + (" (chosen)" if data.get("gpu") and data["gpu"]["name"] == g["name"] else "")
        rows.append([name, format_bytes(g["usable_bytes"])] + [_verdict_cell(g["verdicts"][m["key"]])
                                                               for m in budget["methods"]])
    return headers, rows


def sweep_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    gpu = data.get("gpu")
    headers = ["r", "trainable params", "adapter + grads + optimizer", "activations", "total"]
    if gpu:
        headers += [f"on {gpu['name']}", "max batch", "max seq"]
    rows = []
    for count, b in zip(data["trainable"], data["budgets"]):
        m = next(x for x in b["methods"] if x["key"] == b["primary"])
        row = [count["r"], format_count(count["trainable_params"]),
               format_bytes(m["adapter_weights_bytes"] + m["gradients_bytes"] + m["optimizer_states_bytes"]),
               format_bytes(m["activations_bytes"]), format_bytes(m["total_bytes"])]
        if gpu:
            h = b["headroom"]
            row += [f"{STATUS_MARK[h['verdict']]} {h['verdict']}", _opt(h["max_batch"]), _opt(h["max_seq_len"])]
        rows.append(row)
    return headers, rows


def format_duration(seconds: float | None) -> str:
    """340 ms, 12.4 s, 3 min 20 s, 5 h 07 min, 2 d 3 h; None renders as an em dash."""
    if seconds is None:
        return "—"
    if seconds < 1:
        return f"{1000 * seconds:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h"


def timing_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    timing = data["timing"]
    headers = ["GPU", "bf16 peak (dense)", "step time", "tokens/s", "per 1M tokens"]
    rows = [[g["name"], _tflops(g["peak_bf16_flops"]), format_duration(g["step_time_s"]),
             "—" if g["tokens_per_s"] is None else f"{g['tokens_per_s']:,.0f}",
             format_duration(g["seconds_per_million_tokens"])] for g in timing["gpus"]]
    return headers, rows


def format_flops(n: float) -> str:
    """Decimal SI prefixes, as FLOP counts are quoted: 913.2 GFLOP, 90.6 TFLOP, 1.2 PFLOP."""
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M")):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {prefix}FLOP"
    return f"{n:,.0f} FLOP"


def _tflops(flops: float | None) -> str:
    return "—" if flops is None else f"{flops / 1e12:g} TFLOP/s"


def timing_lines(data: dict) -> list[str]:
    """What the step-time table rests on: the FLOPs per step by term and the assumed utilisation."""
    t = data["timing"]
    f = t["flops"]
    return [f"FLOPs per step (r={t['r']}, {f['tokens']:,} tokens): {format_flops(f['total_flops'])} = forward "
            f"{format_flops(f['forward_flops'])} (base 2N, N = {f['matmul_params']:,}; attention "
            f"{format_flops(f['attention_forward_flops'])}; LoRA {format_flops(f['lora_forward_flops'])}) + backward "
            f"{format_flops(f['backward_flops'])} (frozen base: no weight gradients) + recompute "
            f"{format_flops(f['recompute_flops'])}.",
            f"Step time assumes {100 * t['mfu_assumed']:.0f}% MFU of each card's dense bf16 peak (an assumption, "
            "not a measurement: `lora-doctor probe` measures yours)."]


def _opt(n) -> str:
    return "—" if n is None else f"{n:,}"


def _headroom_lines(data: dict) -> list[str]:
    gpu = data.get("gpu")
    if not gpu:
        return ["No GPU chosen or detected: pass --gpu NAME or --gpu GiB for the largest batch and sequence length."]
    b = data["budgets"][0]
    h = b["headroom"]
    label = next(m["label"] for m in b["methods"] if m["key"] == h["method"])
    lines = [
        f"{gpu['name']} ({gpu['source']}, {format_bytes(gpu['usable_bytes'])} usable){parallel_words(data)}, "
        f"{label}, r={b['r']}: "
        f"needs {format_bytes(h['total_bytes'])} → {h['verdict']} ({100 * h['total_bytes'] / gpu['usable_bytes']:.0f}%).",
    ]
    t = data["train"]
    if h["max_batch"] is None:
        lines.append(f"  Even batch 1 at seq {t['seq_len']} does not fit.")
    else:
        lines.append(f"  Largest batch at seq {t['seq_len']}: {h['max_batch']:,}.")
    if h["max_seq_len"] is None:
        lines.append("  No sequence length fits at batch 1: the static terms alone exceed the card.")
    else:
        cap = " (the model's max_position_embeddings)" if h["seq_len_cap"] else ""
        lines.append(f"  Largest seq_len at batch 1: {h['max_seq_len']:,}{cap}.")
    return lines


def _rank_note(n: dict) -> str:
    names = n.get("names") or []
    where = f" of {', '.join(names)}" if names else ""
    # A narrow odd-one-out (a MoE router) is better dropped from the targets than the rank cut for all.
    hint = (f"--target {','.join(n['others'])}" if names and n.get("others") and n["min_dim"] < 64
            else f"--r {min(64, n['min_dim'])}")
    return (f"r={', '.join(map(str, n['ranks']))} is larger than the smallest targeted dimension "
            f"({n['min_dim']:,}){where}: the update B@A is then no longer low-rank, only a costlier full "
            f"update of that layer. Try: {hint}")


_NOTES = {
    "linears-not-quantized": lambda n: (
        f"{', '.join(n['names'])} ({format_count(n['params'])} weights) stay 16-bit under bitsandbytes "
        "4-bit (transformers swaps only exact nn.Linear / Conv1D)" + (
            ", and prepare_model_for_kbit_training then upcasts them to fp32: "
            f"{format_bytes(n['fp32_bytes'])} in the QLoRA columns." if n.get("upcast", True) else
            f": {format_bytes(n['fp32_bytes'] // 2)} in the QLoRA columns.")),
    "experts-not-quantized": lambda n: (
        f"Fused expert tensors {', '.join(n['names'])} ({format_count(n['params'])} params) are bare "
        "Parameters bitsandbytes does not quantize" + (
            f"; after prepare_model_for_kbit_training they are fp32: {format_bytes(n['fp32_bytes'])}, "
            "which is why QLoRA can cost more than LoRA bf16 here." if n.get("upcast", True) else
            f": {format_bytes(n['fp32_bytes'] // 2)} at 16 bit in the QLoRA columns.")),
    "fp32-upcast": lambda n: (
        f"QLoRA base weights include {format_bytes(n['fp32_bytes'])} of fp32 parameters "
        f"({format_count(n['params'])}: embeddings, norms, lm_head, biases, anything not 4-bit) that "
        "prepare_model_for_kbit_training upcasts from 16 bit."),
    "seq-len-over-max": lambda n: (
        f"--seq-len {n['seq_len']} is longer than the model's max_position_embeddings "
        f"({n['max_position_embeddings']:,}); the budget is computed as asked, but the model "
        f"was not trained past that length (it needs RoPE scaling, or fails for learned positions). "
        f"Try: --seq-len {n['max_position_embeddings']}"),
    "attn-eager-fallback": lambda n: (
        f"{n['requested']} attention is not supported by this model class in transformers (it sets "
        f"_supports_sdpa = False), so it runs {n['used']} attention and the budget costs that, (T, T) "
        "matrices included. Try: --attn flash_attention_2 on CUDA"),
    "fsdp-optim-default": lambda n: (
        f"under --strategy fsdp, train refuses the default --optim {n['default']} (bitsandbytes' kernels cannot "
        f"step FSDP's sharded parameters), so this plan costs --optim {n['used']}, the optimizer train needs "
        f"there too: set train.optim: {n['used']} in the run config."),
    "dora-transient": lambda n: (
        f"DoRA: peft computes each module's weight norm from lora_B(lora_A(eye(in_features))), "
        f"{format_bytes(n['bytes'])} of scratch at the widest module, included in activations."),
    "seq-len-defaulted": lambda n: (
        f"planned at seq_len {n['seq_len']:,}, the model's context length, instead of the default "
        f"{n['default']:,}; pass --seq-len to choose."),
    "rank-exceeds-dim": _rank_note,
    "seq-len-from-data": lambda n: (
        f"memory and step time are costed at seq_len {n['seq_len']:,}, the longest {n['runs']} micro-batch of "
        "--data" + (f", not --seq-len {n['replaced']:,}" if n.get("replaced") is not None else "")
        + " (the data section's padded/packed rows give each layout's own)."),
    "param-targets-dropout": lambda n: (
        f"peft adapts {', '.join(n['names'])} through target_parameters, which refuses lora_dropout "
        f"> 0 (got {n['dropout']}): training with these flags fails. Try: --dropout 0, or --target attn"),
    "count-mismatch": lambda n: (
        f"r={n['r']}: budget arithmetic counts {format_count(n['budget_params'])} adapter parameters, "
        f"peft {format_count(n['peft_params'])}; the memory table uses the arithmetic."),
}
"""Note kind (gather_plan's notes) -> its sentence; a kind this table does not know is not shown."""


def render_notes(data: dict) -> list[str]:
    """One sentence per note from gather_plan, numbers included."""
    return [_NOTES[n["kind"]](n) for n in data.get("notes", []) if n["kind"] in _NOTES]


def render_plan(data: dict) -> str:
    """Terminal view."""
    m = data["model"]
    lines = [
        f"{m['id']}  ({m['architecture']}, model_type {m['model_type']})",
        f"source: {m['source']}  ({m['location']})",
        f"targets ({data['targets']['requested']}): {', '.join(data['targets']['resolved'])}",
        f"step: {_step_line(data)}",
        "",
        "Trainable parameters (peft on the meta model):",
    ]
    lines += [f"  r={c['r']:<4} {peft_line(c)}" for c in data["trainable"]]
    b0 = data["budgets"][0]
    headers, rows = memory_rows(b0)
    lines += ["", f"Memory per training step{parallel_words(data)}, r={b0['r']} (GiB = 2^30 bytes; * = your flags):",
              tabulate(rows, headers=headers, colalign=("left",) + ("right",) * (len(headers) - 1))]
    if len(data["budgets"]) > 1:
        headers, rows = sweep_rows(data)
        lines += ["", f"Rank sweep ({next(x['label'] for x in b0['methods'] if x['key'] == b0['primary'])}):",
                  tabulate(rows, headers=headers, colalign=("right",) + ("right",) * (len(headers) - 1))]
    headers, rows = verdict_rows(data)
    lines += ["", f"GPU verdicts{parallel_words(data)}, r={b0['r']} (⚠ tight = over {100 * data['constants']['tight_fraction']:.0f}% "
                  "of usable memory):",
              tabulate(rows, headers=headers, colalign=("left", "right") + ("left",) * (len(headers) - 2))]
    lines += [""] + _headroom_lines(data)
    if "timing" in data:
        headers, rows = timing_rows(data)
        lines += ["", "Step time (estimate):",
                  tabulate(rows, headers=headers, colalign=("left",) + ("right",) * (len(headers) - 1))]
        lines += timing_lines(data)
    lines += data_lines(data)
    lines += ["", _assumptions_line(data)]
    return "\n".join(lines) + "\n"


def _assumptions_line(data: dict) -> str:
    """What the terminal table rests on, in one sentence (the Markdown report spells it out)."""
    c, t = data["constants"], data["train"]
    levers = t.get("levers") or {}
    if levers.get("chunked_loss") and t.get("grad_ckpt"):
        # stack.loss_beyond_recompute: the chunk buffers and the recomputed layer are never live together.
        loss = (f"a chunked loss ({levers.get('loss_chunks')} checkpointed chunks) whose buffers are never live with "
                "the recomputed layer, so the logits row counts only what a chunk adds beyond it")
    else:
        loss = "full logits (an upper bound with checkpointing)"
    return (f"Exact: weights, quantization constants, adapters, gradients, optimizer states. Modelled: activations "
            f"and {loss}. Runtime overhead = {format_bytes(c['cuda_context_bytes'])} "
            f"CUDA context + {100 * c['allocator_fragmentation']:.0f}% of the rest for allocator fragmentation.")


def render_plan_markdown(data: dict) -> str:
    """GitHub-flavoured Markdown that pastes into an issue: headings, pipe tables, an assumptions list."""
    m = data["model"]
    b0 = data["budgets"][0]
    out = [
        f"## lora-doctor plan: `{m['id']}`",
        "",
        f"- **Model**: {m['architecture']} (`{m['model_type']}`), {m['total_params']:,} parameters; "
        f"config from {m['source']}",
        f"- **Targets** (`{data['targets']['requested']}`): {', '.join(f'`{t}`' for t in data['targets']['resolved'])}",
        f"- **Step**: {_step_line(data)}",
        "",
        "### Trainable parameters (peft, exact)",
        "",
        "```",
        *[f"r={c['r']:<4} {peft_line(c)}" for c in data["trainable"]],
        "```",
        "",
        f"### Memory per training step{parallel_words(data)}, r={b0['r']}",
        "",
    ]
    headers, rows = memory_rows(b0)
    out += [tabulate(rows, headers=headers, tablefmt="github"), "", "GiB = 2^30 bytes. `*` = the method your flags describe.", ""]
    if len(data["budgets"]) > 1:
        headers, rows = sweep_rows(data)
        out += ["### Rank sweep", "", tabulate(rows, headers=headers, tablefmt="github"), ""]
    headers, rows = verdict_rows(data)
    out += [f"### GPU verdicts{parallel_words(data)}, r={b0['r']}", "", tabulate(rows, headers=headers, tablefmt="github"), "",
            f"⚠ tight = over {100 * data['constants']['tight_fraction']:.0f}% of usable memory.", ""]
    out += [f"- {line.strip()}" for line in _headroom_lines(data)]
    if "timing" in data:
        # One bullet per card, not a table: the report keeps its three tables (memory, sweep, verdicts).
        _, rows = timing_rows(data)
        out += ["", "### Step time (estimate)", ""]
        out += [f"- **{name}** ({peak} dense bf16): {step} per step, {tps} tokens/s, {per_m} per 1M tokens"
                for name, peak, step, tps, per_m in rows]
        out += [""] + [f"- {line}" for line in timing_lines(data)]
    out += data_markdown(data)
    notes = render_notes(data)
    if notes:
        out += ["", "### Notes", ""] + [f"- {line}" for line in notes]
    c = data["constants"]
    out += [
        "",
        "<details><summary>Assumptions</summary>",
        "",
        "- Base weights, quantization constants and adapter weights are exact (bitsandbytes QuantState, "
        "peft fp32 adapters, fp32 upcast by `prepare_model_for_kbit_training`); optimizer states are exact for "
        "torch AdamW / bitsandbytes 8-bit AdamW.",
        "- Full bf16 uses the ZeRO mixed-precision convention: bf16 weights and gradients, fp32 master weights "
        "counted with the optimizer states.",
        "- Activations and logits are a model of the tensors autograd saves (per-layer inventory after Korthikanti "
        "et al. 2022), not a measurement; with gradient checkpointing their sum is an upper bound.",
        f"- Runtime overhead: {format_bytes(c['cuda_context_bytes'])} CUDA context + "
        f"{100 * c['allocator_fragmentation']:.0f}% of all other terms for allocator fragmentation.",
        "- GPU usable memory is the total `nvidia-smi` reports (vendor GB are binary GiB, minus ECC/driver reserve).",
        "",
        "</details>",
    ]
    return "\n".join(out) + "\n"
