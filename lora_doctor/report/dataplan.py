"""plan --data rendering: the `data` section of gather_plan's dict -> terminal lines and Markdown. Imports no torch."""

from __future__ import annotations

from tabulate import tabulate

from . import format_bytes

_LAYOUTS = (("padded", "padded to the longest in each batch"), ("packed", "packed into rows of max_length"))


def layout_rows(d: dict) -> tuple[list[str], list[list[str]]]:
    """One row per layout: tokens, padding, steps per epoch, memory at the longest batch."""
    headers = ["layout", "rows", "tokens (real / computed)", "padding", "steps/epoch", "longest batch",
               "memory (longest)"]
    rows = []
    for key, _ in _LAYOUTS:
        x = d[key]
        mark = " *" if d["runs"] == key else ""
        rows.append([key + mark, f"{x['rows']:,}", f"{x['real_tokens']:,} / {x['padded_tokens']:,}",
                     f"{100 * x['padding_fraction']:.1f}%", f"{x['steps_per_epoch']:,}",
                     f"{d['batch']} x {x['longest_batch_tokens']:,}", format_bytes(x["memory"]["total_bytes"])])
    return headers, rows


def time_rows(d: dict) -> tuple[list[str], list[list[str]]]:
    """One row per card: time per epoch padded and packed, and the run's time as it is configured to run."""
    from .plan import format_duration  # report/plan imports this module
    headers = ["GPU", "epoch, padded", "epoch, packed", f"run ({d[d['runs']]['run_steps']:,} steps, {d['runs']})"]
    padded = d["padded"]["gpus"]
    packed = {g["name"]: g for g in d["packed"]["gpus"]}
    rows = [[g["name"], format_duration(g["epoch_time_s"]), format_duration(packed[g["name"]]["epoch_time_s"]),
             format_duration((g if d["runs"] == "padded" else packed[g["name"]])["run_time_s"])] for g in padded]
    return headers, rows


def _summary(d: dict) -> str:
    return (f"{d['path']} ({d['format']}): {d['examples']:,} training examples, {d['tokens']:,} tokens, mean "
            f"{d['mean_tokens']:,.1f}, longest {d['longest_tokens']:,} (max_length {d['max_length']:,}; "
            f"{d['truncated']:,} truncated); {d['eval_examples']:,} held out for eval.")


def _basis(d: dict) -> list[str]:
    from .plan import format_flops
    runs = d[d["runs"]]
    world = d.get("world_size", 1)
    ranks = (f" on each of {world} GPUs (global micro-batch {d['batch'] * world}; an epoch's time is each "
             "micro-batch's slowest rank, communication not priced)") if world > 1 else ""
    attention = ("per example (flash_attention_2 varlen: sum of l^2 per row)" if runs.get("attention_per_example")
                 else f"per row at the batch width ({d.get('attn_impl', 'sdpa')} computes every block of its mask: "
                      "width^2, the upper bound of a packed row's block-diagonal sum of l^2)")
    return [f"Batch {d['batch']}{ranks} x grad_accum {d['grad_accum']}, seed {d['seed']} order; "
            f"{format_flops(runs['epoch_flops'])} per epoch as it runs ({d['runs']}); time at "
            f"{100 * d['mfu_assumed']:.0f}% MFU of each card's dense bf16 peak. Memory is the "
            f"{runs['memory']['method']} budget at the longest batch. * = how this run is configured.",
            f"Packing: packing.pack_groups, as train packs (data.packing). Attention priced {attention}. "
            "No cost column: the GPU table has no sourced prices."]


def data_lines(data: dict) -> list[str]:
    """Terminal lines of the data section; [] without --data."""
    d = data.get("data")
    if not d:
        return []
    headers, rows = layout_rows(d)
    t_headers, t_rows = time_rows(d)
    return (["", "Dataset (real token lengths):", _summary(d),
             tabulate(rows, headers=headers, colalign=("left",) + ("right",) * (len(headers) - 1)), "",
             tabulate(t_rows, headers=t_headers, colalign=("left",) + ("right",) * (len(t_headers) - 1))]
            + _basis(d))


def data_markdown(data: dict) -> list[str]:
    """Markdown lines of the data section; [] without --data."""
    d = data.get("data")
    if not d:
        return []
    headers, rows = layout_rows(d)
    t_headers, t_rows = time_rows(d)
    return (["", "### Dataset (real token lengths)", "", _summary(d), "",
             tabulate(rows, headers=headers, tablefmt="github"), "",
             tabulate(t_rows, headers=t_headers, tablefmt="github"), ""]
            + [f"- {line}" for line in _basis(d)])
