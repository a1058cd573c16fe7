"""The catalogue's documentation: per registered check, its cause, why it matters, the fix and the test that
plants it. Codes and severities are read off each check's source, so they cannot drift from the code;
scripts/gen_checks_docs.py renders this as docs/checks.md, and a test keeps every check described.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass

from .registry import CHECKS

T, M, C = "tests/test_checks.py", "tests/test_checks_more.py", "tests/test_chat_checks.py"


@dataclass(frozen=True)
class Entry:
    cause: str
    why: str
    """Why it matters: what the run does, or fails to learn."""
    fix: str
    test: str
    """The test that plants the fault: file::case."""


ENTRIES: dict[str, Entry] = {
    "target_not_found": Entry(
        "A target leaf name matches no module", "peft raises, or nothing is adapted",
        "--target a preset or a listed leaf", f"{T}::01-target-not-found"),
    "zero_trainable": Entry(
        "The adapter has 0 trainable parameters", "nothing can learn",
        "target modules that exist", f"{T}::02-zero-trainable"),
    "partial_coverage": Entry(
        "Some targets match nothing, or hit a fused projection", "less is adapted than asked, or more",
        "name the fused leaf; adjust --r", f"{T}::03-partial-coverage"),
    "param_target_unsupported": Entry(
        "DoRA/dropout on MoE parameter targets", "peft refuses at get_peft_model",
        "no DoRA/dropout there, or --target attn", f"{T}::test_dora_or_dropout_on_expert_tensors_is_an_error"),
    "grad_ckpt_input_grads": Entry(
        "Reentrant checkpointing, frozen embeddings, no input grads", "LoRA weights get no gradient",
        "enable_input_require_grads / use_reentrant=False", f"{T}::04-grad-ckpt"),
    "merge_into_4bit": Entry(
        "Merging the adapter into a 4-bit base", "rounding loses part of the adapter",
        "merge into a 16-bit reload", f"{T}::18-merge"),
    "memory_fit": Entry(
        "The plan exceeds or nears the GPU's memory", "CUDA out of memory",
        "--batch/--max-length that fit; --grad-ckpt; --quant nf4", f"{T}::19-no-fit"),
    "rank_vs_data": Entry(
        "Few examples per trainable parameter", "the adapter memorises the data",
        "lower --r, fewer targets, more data", f"{T}::20-rank"),
    "lr_and_scaling": Entry(
        "lr <= 0 or far from 1e-4..3e-4; unusual alpha/r", "no learning, or divergence",
        "--lr 2e-4; --alpha 2r", f"{T}::21-lr-zero"),
    "device_map_distributed": Entry(
        "device_map spreads the model under DDP", "DDP cannot wrap it; OOM",
        "device_map={'': LOCAL_RANK}", f"{T}::22-device-map"),
    "fsdp_incompatible": Entry(
        "A setting FSDP2 cannot shard: a bitsandbytes optimizer, QLoRA on CPU, a pre-quantized checkpoint",
        "train under FSDP refuses it before loading", "--optim adamw; a 16-bit checkpoint",
        "tests/test_fsdp.py::test_check_reports_the_engine_refusal"),
    "fp16_precision": Entry(
        "fp16 on a bf16 checkpoint; fp16 trainable weights under AMP", "overflow to NaN; GradScaler raises",
        "--precision bf16; fp32 adapters", f"{T}::08-fp16-params"),
    "bf16_support": Entry(
        "bf16 on a GPU without native bf16", "fails or runs emulated",
        "--precision fp16 --compute-dtype fp16", f"{T}::09-bf16-gpu"),
    "compute_dtype_matches_precision": Entry(
        "4-bit compute dtype differs from autocast dtype", "two half formats mixed in one forward",
        "--compute-dtype = --precision", f"{T}::08-compute-dtype"),
    "no_pad_token": Entry(
        "The tokenizer has no pad token", "batching fails (or is masked by position)",
        "set a distinct pad token", f"{T}::10-no-pad"),
    "eos_learning": Entry(
        "EOS is a label in no example; pad == EOS", "the model never learns to stop",
        "append EOS; mask padding by position", f"{T}::11-pad-eos-labels"),
    "left_padding": Entry(
        "padding_side='left' while training", "NaN in half precision; shifted positions",
        "padding_side: right", f"{T}::14-left"),
    "vocab_vs_embeddings": Entry(
        "len(tokenizer) exceeds the embedding rows", "index out of range; new rows untrained",
        "resize_token_embeddings + train the rows", f"{T}::15-vocab"),
    "untrained_label_tokens": Entry(
        "Label tokens whose embedding rows are ~0 or mean-initialised", "frozen untrained rows: garbage or NaN",
        "trainable_token_indices / modules_to_save", f"{T}::15-untrained-rows"),
    "all_labels_masked": Entry(
        "Every label is -100", "nothing to learn; loss NaN or 0",
        "response marker; raise max_length", f"{T}::12-all-masked"),
    "truncation": Entry(
        "Examples cut by max_length, or their whole response lost", "answers stop mid-way; examples teach nothing",
        "--max-length", f"{T}::13-truncated"),
    "dataset_format": Entry(
        "Rows with different field layouts; empty fields", "several templates learned; empty answers",
        "one format; drop empty rows", f"{T}::16-mixed"),
    "bitsandbytes": Entry(
        "bitsandbytes missing or its native library fails", "from_pretrained fails",
        "pip install -U bitsandbytes", f"{T}::17-bnb-missing"),
    "adapter_gradients": Entry(
        "Adapter modules without gradient or change; base params with grads", "nothing (or part) learns",
        "input grads; optimizer gets the adapter", f"{T}::05-no-grad"),
    "loss_finite": Entry(
        "NaN/inf loss during the probe", "the run diverged",
        "check labels, precision, lr", f"{T}::06-nan"),
    "loss_moving": Entry(
        "Loss 0 throughout, or flat; or no probed step had a labelled token", "nothing scored, or no learning",
        "check labels; raise lr; --max-length", f"{T}::07-flat"),
    "chat_format_mismatch": Entry(
        "Chat rows read with a non-chat format", "the template is never applied",
        "--format chat", f"{C}::chat-format-mismatch"),
    "chat_no_template": Entry(
        "The tokenizer has no chat template", "rows cannot be rendered",
        "a tokenizer with chat_template", f"{C}::chat-no-template"),
    "chat_assistant_mask": Entry(
        "The assistant mask is empty, covers the prompt, or disagrees", "nothing, or the prompt, is trained",
        "fix the template's generation markers", f"{C}::chat-mask-empty"),
    "chat_eot_supervised": Entry(
        "The end-of-turn token is not a label", "the model never ends its turn",
        "keep EOT in the assistant mask", f"{C}::chat-eot-unsupervised"),
    "chat_truncation": Entry(
        "Assistant turns cut by max_length", "turns teach nothing",
        "--max-length", f"{C}::chat-truncated"),
    "chat_pad_is_eot": Entry(
        "Pad is the end-of-turn token", "EOT labels masked by id",
        "a distinct pad token", f"{C}::chat-pad-is-eot"),
    "chat_bos_twice": Entry(
        "Template BOS plus tokenizer BOS", "a prefix inference never sees",
        "add_special_tokens=False", f"{C}::chat-bos-twice"),
    "chat_empty_assistant": Entry(
        "Empty assistant turns", "the model learns to say nothing",
        "drop them", f"{C}::chat-empty-assistant"),
    "chat_roles_alternate": Entry(
        "Roles do not alternate", "templates raise or mis-render",
        "fix the rows", f"{C}::chat-roles-alternate"),
    "chat_no_assistant_turn": Entry(
        "Rows without an assistant turn", "they teach nothing",
        "drop them", f"{C}::chat-no-assistant-turn"),
    "chat_special_token_missing": Entry(
        "Template tokens unknown to the tokenizer", "they split into pieces",
        "add the tokens", f"{C}::chat-special-token-missing"),
    "chat_special_token_outside_embedding": Entry(
        "Template token ids past the embedding", "index out of range",
        "resize + train the rows", f"{C}::chat-special-token-outside-embedding"),
    "chat_empty_think": Entry(
        "Empty <think> blocks", "the model learns to skip reasoning",
        "fill or drop them", f"{C}::chat-empty-think"),
    "no_eos_token": Entry(
        "The tokenizer has no EOS, so data.add_eos appends nothing", "the model never learns to stop",
        "give the tokenizer its EOS", f"{M}::no-eos"),
    "eos_mismatch": Entry(
        "Tokenizer EOS not in generation_config/config eos_token_id", "generate() never stops on the learned EOS",
        "align the named eos_token_id", f"{M}::eos-vs-generation"),
    "bos_twice": Entry(
        "The template/text holds a literal BOS and the tokenizer adds one",
        "training sees a prefix inference never does",
        "remove the literal BOS", f"{M}::bos-twice"),
    "token_ids_in_range": Entry(
        "A token id at or past the embedding rows", "IndexError / device assert mid-run",
        "the model's tokenizer, or resize + train rows", f"{M}::id-out-of-range"),
    "trainable_token_indices_in_range": Entry(
        "lora.trainable_token_indices past the embedding rows", "peft's IndexError while wrapping the model",
        "ids the embedding has; resize first", f"{M}::token-index-past-rows"),
    "untrained_input_tokens": Entry(
        "Input tokens with zero / mean-initialised rows, embeddings frozen", "read as noise throughout training",
        "trainable_token_indices / modules_to_save", f"{M}::untrained-inputs"),
    "context_length": Entry(
        "max_length (or an example) past max_position_embeddings / n_positions",
        "IndexError mid-run, or unseen positions",
        "--max-length <= the context", f"{M}::beyond-context"),
    "prompt_fills_max_length": Entry(
        "Prompts that alone fill max_length", "no response token survives",
        "--max-length; shorter prompts", f"{M}::prompt-fills"),
    "duplicate_rows": Entry(
        "Rows repeated verbatim", "weighted several times; memorised",
        "deduplicate", f"{M}::duplicates"),
    "echo_responses": Entry(
        "Responses that repeat the prompt", "the model learns to echo",
        "check data.response_field; fix rows", f"{M}::echo"),
    "mixed_templates": Entry(
        "Two prompt templates in the text fields", "several turn markers learned",
        "one template", f"{M}::mixed-templates"),
    "empty_responses": Entry(
        "Most or all responses empty", "only 'stop at once' is learned",
        "data.response_field; drop empty rows", f"{M}::all-empty"),
    "eval_set": Entry(
        "Eval file missing or empty; eval overlapping train", "train stops; eval loss measures memorisation",
        "fix data.eval_path; deduplicate", f"{M}::eval-missing"),
    "warmup_vs_run": Entry(
        "Warmup at least as long as the run", "lr never reaches its peak",
        "--warmup ~10% of steps", f"{M}::warmup"),
    "few_optimizer_steps": Entry(
        "batch x grad_accum x processes leaves 1 or few steps", "the adapter barely moves",
        "--grad-accum / --epochs / --batch", f"{M}::one-step"),
    "eval_without_eval_set": Entry(
        "eval_every with no eval set", "no eval loss is ever computed",
        "data.eval_fraction / data.eval_path", f"{M}::eval-every-no-set"),
    "epochs_vs_max_steps": Entry(
        "max_steps far past, or short of, the epochs asked", "data repeated, or not all seen",
        "drop train.max_steps or match it", f"{M}::steps-before-epochs"),
    "router_adapted": Entry(
        "all-linear adapts an MoE router", "routing changes (a choice)",
        "--target without the router", f"{M}::router"),
}

_FINDING = re.compile(r"Severity\.(\w+)(?: if [^,]+ else Severity\.(\w+))?,\s*\"([a-z0-9-]+)\"")


_BY_NAME = re.compile(r"Finding\(\s*[a-z_]+,\s*\"([a-z0-9-]+)\"")


def codes_and_severities(name: str) -> list[tuple[str, str]]:
    """(code, severity) pairs a check can emit, read off its source."""
    src = inspect.getsource(CHECKS[name])
    out: dict[str, set[str]] = {}
    for m in _FINDING.finditer(src):
        out.setdefault(m.group(3), set()).update(s.lower() for s in m.groups()[:2] if s)
    # A severity chosen into a variable first (severity = ... ; Finding(severity, "code", ...)).
    for m in _BY_NAME.finditer(src):
        out.setdefault(m.group(1), set()).update(s.lower() for s in re.findall(r"Severity\.(\w+)", src))
    return [(code, "/".join(sorted(sev, key=["error", "warning", "info"].index))) for code, sev in out.items()]


def markdown() -> str:
    """docs/checks.md: one row per (check, code)."""
    rows = ["| code | severity | cause | why it matters | fix | planted in |", "|---|---|---|---|---|---|"]
    n = 0
    for name in CHECKS:
        e = ENTRIES[name]
        for code, sev in codes_and_severities(name) or [(name.replace("_", "-"), "?")]:
            n += 1
            rows.append(f"| `{code}` | {sev} | {e.cause} | {e.why} | {e.fix} | `{e.test}` |")
    head = ("# The doctor's checks\n\nGenerated from the registry by `scripts/gen_checks_docs.py`; do not edit.\n\n"
            f"{len(CHECKS)} checks cover {n} failure modes (finding codes).\n\n")
    return head + "\n".join(rows) + "\n"
