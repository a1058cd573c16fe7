"""`lora-doctor probe`: a short real run with the training engine, then the doctor's verdict.

Flow: config -> Engine.setup() -> run_steps(N) -> plan prediction (budget.py) -> checks -> report.
Exit 0 healthy (warnings allowed), 1 when any error-level finding, 2 on bad input.
"""

from __future__ import annotations

import click

from ..errors import LoraDoctorError
from ..fileio import check_output_dir
from ..diagnose import diagnose, out_of_memory_finding, write_reports
from ..report.summary import summary_lines
from ..runconfig import RunConfig
from .options import config_from_cli, run_options

DEFAULT_PROBE_STEPS = 10


def run_probe(cfg: RunConfig, steps: int = DEFAULT_PROBE_STEPS, *, model_hook=None, log=None):
    """Run the probe; returns (RunResult or None, result dict for the report, findings list).

    An out-of-memory during load or the steps becomes an error finding (exit 1), not exit 2.
    """
    from ..engine import BadData, Engine, OutOfMemory

    log = log or (lambda msg: None)
    engine = Engine(cfg, model_hook=model_hook)
    oom = None
    try:
        engine.setup(log=log)
        log(f"{engine.model_info.trainable_params:,} trainable params in {engine.model_info.n_adapted_modules} modules; "
            f"{engine.data.stats.n_examples} examples; running {steps} step(s) ...")
        if steps > engine.total_steps:
            log(f"note: the full run is only {engine.total_steps} step(s); the probe goes past it.")
        engine.run_steps(steps, callbacks=[
            lambda e, rec: log(f"  step {rec.step}/{steps}: loss {rec.loss:.4f}  {rec.step_time_s:.2f} s")])
    except (OutOfMemory, BadData) as e:  # findings, not crashes
        oom = e
    first = (out_of_memory_finding(oom),) if oom is not None else ()
    if engine.data is None or getattr(engine, "model_info", None) is None:
        if oom is None:
            raise RuntimeError("engine setup did not finish")
        # OOM while loading: nothing measured but the peak.
        d = diagnose("probe", cfg, None, None, extra={"error": oom.message}, findings_first=first)
        return None, d.report, list(d.findings)
    result = engine.result("probe", stopped_early="oom" if oom else None, error=oom.message if oom else None,
                           extra=rank_peaks(engine, log))
    d = diagnose("probe", cfg, engine, result, findings_first=first)
    return result, d.report, list(d.findings)


def rank_peaks(engine, log) -> dict:
    """Under several processes, every rank's MemoryStats gathered to all (rank 0 reports them): FSDP and DDP
    ranks differ (rank 0 holds the eval and the writes; shards can be uneven). {} with one process."""
    if engine.world_size == 1:
        return {}
    from ..report import format_bytes

    per_rank = engine.placement.gather_objects({phase: m.to_dict() for phase, m in engine.memory.items()})
    for rank, phases in enumerate(per_rank):
        if engine.is_main:
            peaks = ", ".join(f"{phase} {format_bytes(m.get('peak_bytes'))}" for phase, m in phases.items())
            log(f"rank {rank} peak: {peaks} ({engine.placement.strategy})")
    return {"memory_per_rank": per_rank, "strategy": engine.placement.strategy}


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
@click.option("--steps", "probe_steps", type=int, default=DEFAULT_PROBE_STEPS, show_default=True,
              help="Optimizer steps to run.")
@click.option("--json", "as_json", is_flag=True, help="Print the result JSON to stdout instead of the summary.")
@click.option("--no-report", is_flag=True, help="Do not write JSON/Markdown under reports/.")
def command(config, probe_steps, as_json, no_report, **params):
    """Run a few real training steps and measure memory, gradient flow and loss.

    Loads the model exactly as `train` will (nf4 via bitsandbytes, also on CPU), applies LoRA, runs
    --steps optimizer steps, compares the measured peak with plan's prediction, runs the doctor's
    checks and writes JSON + Markdown under reports/. Exit 0 healthy, 1 error finding, 2 bad input.

    \b
    Examples:
      lora-doctor probe examples/tiny.yaml
      lora-doctor probe examples/tiny.yaml --steps 20 --lr 1e-3 --target qv
      lora-doctor probe --model examples/tiny-llama --data examples/data/tiny.jsonl --quant none
    """
    if probe_steps <= 0:
        raise LoraDoctorError(f"--steps must be a positive integer; got {probe_steps}.", "Try: --steps 10")
    cfg = config_from_cli(config, params)
    if not no_report:
        check_output_dir(cfg.output.reports_dir, "reports folder")
    _, report, findings = run_probe(cfg, probe_steps, log=lambda m: click.echo(m, err=True))
    if not no_report:
        for path in write_reports(report, cfg, "probe"):
            click.echo(f"wrote {path}", err=True)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo("\n".join(summary_lines(report)))
    if any(f.severity.value == "error" for f in findings):
        click.get_current_context().exit(1)
