"""`lora-doctor train`: the full run on the probe's engine and config.

Writes under output.dir: loss_log.jsonl (one StepRecord per line), checkpoints/step-NNNNNN
(atomic, resumable), adapter/ (peft save_pretrained: adapter_model.safetensors +
adapter_config.json), optional merged/ (16-bit), loss_curve.png, train_result.json; and a report
under reports/. Ctrl-C or SIGTERM stops at the next step boundary and saves a checkpoint;
`--resume` continues from the latest one and ends where an uninterrupted run would.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import click

from ..diagnose import diagnose, eval_loss_summary, write_reports
from ..checkpoint import refuse_other_run
from ..errors import LoraDoctorError
from ..fileio import check_output_dir
from ..report.levers import levers_line
from ..runconfig import RunConfig
from .options import config_from_cli, run_options

LOSS_LOG = "loss_log.jsonl"
LOSS_PNG = "loss_curve.png"
RESULT_JSON = "train_result.json"
COMPARE_MD = "compare.md"
EXIT_INTERRUPTED = 130


class StopFlag:
    """Set by SIGINT/SIGTERM; a second Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def __call__(self) -> bool:
        return self.reason is not None

    def _handler(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        click.echo(f"\n{self.reason}: finishing this step, then saving a checkpoint (Ctrl-C again to abort).", err=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. some test runners): no handler, no graceful stop
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def plot_loss_curve(path: Path, steps, eval_losses) -> Path | None:
    """loss_curve.png via matplotlib's Agg backend; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from ..fileio import write_bytes_atomic

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([s.step for s in steps], [s.loss for s in steps], label="train loss", lw=1.2)
    if eval_losses:
        ax.plot([s for s, _ in eval_losses], [v for _, v in eval_losses], "o-", label="eval (cross-entropy)", ms=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def progress_bar(total: int, initial: int, enabled: bool | None = None):
    """A tqdm bar on stderr, or None: off when stderr is not a terminal (CI logs, pipes), where the
    per-N-steps log lines are the progress instead."""
    import sys

    if enabled is None:
        enabled = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, dynamic_ncols=True, desc="train")


class TrainProgress:
    """The loss log (loss_log.jsonl), the tqdm bar and the progress lines of one run: the engine's callback."""

    def __init__(self, engine, log_path: Path, say, show_progress: bool | None):
        self.engine, self.log_path, self.say = engine, log_path, say
        self.cfg, self.total = engine.cfg, engine.total_steps
        self.bar = progress_bar(self.total, engine.step, show_progress) if engine.is_main else None
        self.t0, self.start_step, self.log_started = time.perf_counter(), engine.step, False

    def log(self, msg: str) -> None:
        """One voice under torchrun / accelerate launch, above the bar rather than through it."""
        if not self.engine.is_main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            self.say(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _append(self, e, rec) -> None:
        from ..checkpoint import write_loss_log

        if not self.log_started:
            # Written at the first finished step, not before: a run that dies in step 1 (OOM) leaves no
            # empty log. The history holds a resumed run's steps up to its checkpoint, then this one.
            write_loss_log(self.log_path, e.history)
            self.log_started = True
        else:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec.to_dict()) + "\n")

    def __call__(self, e, rec) -> None:
        if not e.is_main:
            return
        self._append(e, rec)
        total = self.total
        if self.bar is not None:
            self.bar.update(rec.step - self.bar.n)
            post = {"loss": f"{rec.loss:.4f}", "lr": f"{rec.lr:.1e}"}
            if rec.eval_loss is not None:
                post["eval"] = f"{rec.eval_loss:.4f}"
            self.bar.set_postfix(post, refresh=False)
            if rec.eval_loss is not None:
                self.log(f"step {rec.step}/{total}: eval loss {rec.eval_loss:.4f}")
            return
        if rec.step % self.cfg.train.log_every == 0 or rec.step == total:
            rate = (time.perf_counter() - self.t0) / max(1, rec.step - self.start_step)
            ev = f"  eval {rec.eval_loss:.4f}" if rec.eval_loss is not None else ""
            self.log(f"step {rec.step}/{total} ({100 * rec.step // total}%)  loss {rec.loss:.4f}{ev}  lr {rec.lr:.2e}  "
                     f"{rec.step_time_s:.2f} s/step  eta {rate * (total - rec.step):.0f} s")


def _resume(engine, resume: bool, checkpoint: str | None, log) -> None:
    if not (resume or checkpoint):
        return
    path = Path(checkpoint) if checkpoint else engine.latest_checkpoint()
    if path is None:
        raise LoraDoctorError(f"No checkpoint to resume in '{Path(engine.cfg.output.dir) / 'checkpoints'}'.",
                              "Start without --resume, or pass --checkpoint PATH to a step-NNNNNN folder.")
    engine.load_checkpoint(path)
    log(f"resumed from {path} at step {engine.step}")


def _finish(engine, outputs: dict, log_path: Path, log) -> None:
    """The finished run's artifacts: adapter, full loss log, curve, optional merge (main process only)."""
    from ..checkpoint import merge_adapter, write_loss_log

    cfg, out_dir = engine.cfg, Path(engine.cfg.output.dir)
    outputs["adapter"] = str(engine.save_adapter())
    outputs["loss_log"] = str(log_path)
    if not engine.is_main:
        return
    write_loss_log(log_path, engine.history)
    if cfg.output.plot:
        png = plot_loss_curve(out_dir / LOSS_PNG, engine.history, engine.eval_history)
        if png is not None:
            outputs["loss_curve"] = str(png)
    if cfg.output.merge:
        log("merging the adapter into a 16-bit copy of the base (reloaded unquantized) ...")
        outputs["merged"] = str(merge_adapter(cfg, outputs["adapter"]))


def train(cfg: RunConfig, *, resume: bool = False, checkpoint: str | None = None, should_stop=None,
          log=None, model_hook=None, write_report: bool = True, show_progress: bool | None = None):
    """Run (or resume) a training run. Returns (engine, RunResult, outputs dict).

    Args:
        show_progress: a tqdm bar on stderr; None shows it when stderr is a terminal.

    Raises:
        LoraDoctorError: bad config/data/model, unwritable output folder, no checkpoint to resume,
            out of memory.
    """
    from ..engine import Engine

    out_dir = Path(cfg.output.dir)
    check_output_dir(out_dir, "output folder")  # before the load, not after the run
    engine = Engine(cfg, model_hook=model_hook)
    say = log or (lambda msg: None)

    def main_log(msg):  # one voice under torchrun / accelerate launch; TrainProgress.log while the bar is up
        if engine.is_main:
            say(msg)

    engine.setup(log=main_log)
    outputs: dict[str, str] = {}
    _resume(engine, resume, checkpoint, main_log)
    total = engine.total_steps
    main_log(f"{engine.model_info.trainable_params:,} trainable params; {engine.data.stats.n_examples} examples; "
             f"{total} steps of {cfg.train.batch}x{cfg.train.grad_accum}x{engine.world_size} examples")
    main_log(f"engine levers: {levers_line(cfg.to_dict(), engine.levers_off)}")

    def periodic_save(e, rec):
        every = cfg.train.save_every
        if every and rec.step % every == 0 and rec.step < total:
            e.save_checkpoint()

    progress = TrainProgress(engine, out_dir / LOSS_LOG, say, show_progress)
    try:
        engine.run_steps(None, callbacks=[progress, periodic_save], should_stop=should_stop)
    finally:
        progress.close()
    stopped = should_stop is not None and should_stop() and engine.step < total
    outputs["checkpoint"] = str(engine.save_checkpoint())
    if stopped:
        main_log(f"stopped at step {engine.step}/{total}; checkpoint {outputs['checkpoint']}")
        result = engine.result("train", stopped_early="signal",
                               extra={"outputs": outputs, **eval_loss_summary(engine.eval_history)})
        return engine, result, outputs
    _finish(engine, outputs, out_dir / LOSS_LOG, main_log)
    result = engine.result("train", extra={"outputs": outputs, **eval_loss_summary(engine.eval_history)})
    if engine.is_main:
        from ..fileio import write_json_atomic

        outputs["result"] = str(write_json_atomic(out_dir / RESULT_JSON, result.to_dict()))
    return engine, result, outputs


def resume_command(ctx: click.Context) -> str:
    """The command line that was run, as typed options, with --resume: the same output folder and config,
    so the hint resumes this run (not the config's default output.dir)."""
    from click.core import ParameterSource

    words = ["lora-doctor", "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in ("resume", "checkpoint", "overwrite") or value is None:
            continue
        if isinstance(param, click.Argument):
            words.append(shlex.quote(str(value)))
            continue
        if ctx.get_parameter_source(param.name) is not ParameterSource.COMMANDLINE:
            continue
        if param.is_flag:
            if value:
                words.append(param.opts[0])
            elif param.secondary_opts:
                words.append(param.secondary_opts[0])
            continue
        for v in (value if param.multiple else [value]):
            words += [param.opts[0], shlex.quote(str(v))]
    return " ".join(words + ["--resume"])


def summary_line(result) -> str | None:
    """'loss: 3.1 -> 2.4 over 30 steps; eval ...' for the end of a run; None when no step ran."""
    ls, ev = result.loss, result.extra
    if ls.first is None:
        return None
    line = f"loss: {ls.first:.4f} -> {ls.last:.4f} over {ls.n_steps} step{'' if ls.n_steps == 1 else 's'}"
    if ev.get("eval_points", 0) > 1:
        line += (f"; eval {ev['eval_loss_first']:.4f} -> {ev['eval_loss_last']:.4f} "
                 f"(best {ev['eval_loss_best']:.4f} at step {ev['eval_loss_best_step']})")
    elif ev.get("eval_loss_last") is not None:
        line += f"; eval {ev['eval_loss_last']:.4f}"
    return line


def _write_run_report(cfg: RunConfig, engine, result, log) -> None:
    """The doctor's report of one run under reports_dir; compare finds its findings by outputs_dir."""
    report = diagnose("train", cfg, engine, result, extra={"outputs_dir": cfg.output.dir}).report
    for path in write_reports(report, cfg, "train"):
        log(f"wrote {path}")


def _interrupted(at: str) -> None:
    click.echo(f"Interrupted {at}. Resume: {resume_command(click.get_current_context())}", err=True)
    click.get_current_context().exit(EXIT_INTERRUPTED)


def _train_sweep(cfg: RunConfig, axes, resume: bool, no_report: bool, log) -> None:
    """Every variant through run_sweep, one StopFlag for all; then the comparison of the finished sweep."""
    from ..compare import compare_runs
    from ..sweep import run_sweep
    from .compare import write_comparison

    # A resumed sweep with every variant finished starts no Engine: the launcher's RANK says who prints.
    is_main = int(os.environ.get("RANK", "0")) == 0
    with StopFlag() as stop:
        def train_variant(variant_cfg: RunConfig, resume: bool) -> None:
            nonlocal is_main
            if stop():  # a signal between variants: leave the next one untouched, --resume starts it
                return
            engine, result, _ = train(variant_cfg, resume=resume, should_stop=stop, log=log)
            is_main = engine.is_main
            # An interrupted variant reports when it finishes (--resume), so compare finds one report per run.
            if engine.is_main and not no_report and result.stopped_early is None:
                _write_run_report(variant_cfg, engine, result, log)
            if engine.is_main and summary_line(result):
                log(f"{Path(variant_cfg.output.dir).name}: {summary_line(result)}")
            # Every rank then reads the same folder state (run_sweep decides by train_result.json).
            engine.placement.barrier()

        outcomes = run_sweep(cfg, axes, train_variant, resume=resume, log=log)
    if not is_main:
        return
    stopped = next((o for o in outcomes if o.status == "interrupted"), None)
    if stopped is not None:
        _interrupted(f"in sweep variant {stopped.variant.name}")
    sweep_dir = Path(cfg.output.dir)
    text = write_comparison(compare_runs([sweep_dir]), sweep_dir / COMPARE_MD, no_plot=not cfg.output.plot)
    click.echo(text, nl=False)
    log(f"Compare again: lora-doctor compare {shlex.quote(str(sweep_dir))}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@run_options
@click.option("--steps", type=int, help="Optimizer steps (overrides train.max_steps).")
@click.option("--merge/--no-merge", default=None, help="Merge the adapter into a 16-bit base after training.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output.dir (a sweep: "
              "skip finished variants, continue the interrupted one).")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Continue from this step-NNNNNN folder.")
@click.option("--sweep", multiple=True, metavar="KEY=V1,V2,...",
              help="Train one variant per value, one after another, each in its own folder under output.dir, "
                   "then compare them. Repeat for a grid. Any config key, e.g. --sweep loss.kind=ce,focal.")
@click.option("--overwrite", is_flag=True, help="Replace the run already in output.dir (its checkpoints and results).")
@click.option("--no-report", is_flag=True, help="Do not write JSON/Markdown under reports/.")
def command(config, steps, merge, resume, checkpoint, sweep, overwrite, no_report, **params):
    """Train with the same engine and config as `probe`: adapter, checkpoints, loss log, curve.

    Progress goes to stderr. Ctrl-C / SIGTERM saves a checkpoint at the next step boundary;
    --resume continues from it and reaches the same result as an uninterrupted run. Multi-GPU:
    accelerate launch -m lora_doctor.cli train CONFIG (DDP), or with --config_file examples/fsdp.yaml
    (FSDP2, train.distributed).

    With --sweep every variant keeps the config's seed, data order and eval set; the compare table
    goes to stdout and compare.md (with compare.png) into output.dir.

    \b
    Examples:
      lora-doctor train examples/tiny.yaml
      lora-doctor train examples/tiny.yaml --steps 100 --merge
      lora-doctor train examples/tiny.yaml --resume
      lora-doctor train examples/tiny.yaml --sweep loss.kind=ce,label_smoothing,focal
    """
    cfg = config_from_cli(config, params, extra={"train.max_steps": steps, "output.merge": merge})
    axes = None
    if sweep:
        from ..sweep import parse_sweep, sweep_variants

        if checkpoint:
            raise LoraDoctorError("--checkpoint names one run's checkpoint; a sweep resumes each variant "
                                  "from its own folder.", "Use --resume with --sweep.")
        axes = parse_sweep(sweep)
        sweep_variants(cfg, axes)  # every variant's config is valid before anything is written
    check_output_dir(cfg.output.dir, "output folder")
    refuse_other_run(cfg.output.dir, resuming=bool(resume or checkpoint), overwrite=overwrite)
    if not no_report:
        check_output_dir(cfg.output.reports_dir, "reports folder")
    log = (lambda m: click.echo(m, err=True))
    if axes is not None:
        return _train_sweep(cfg, axes, resume, no_report, log)
    with StopFlag() as stop:
        engine, result, outputs = train(cfg, resume=resume, checkpoint=checkpoint, should_stop=stop, log=log)
    if not engine.is_main:
        return
    if not no_report:
        _write_run_report(cfg, engine, result, log)
    for key, path in outputs.items():
        click.echo(f"{key}: {path}")
    if summary_line(result):
        click.echo(summary_line(result))
    if result.stopped_early == "signal":
        _interrupted(f"at step {result.steps[-1].step if result.steps else 0}")
