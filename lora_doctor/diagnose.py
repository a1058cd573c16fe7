"""What probe and train share: predict memory, run the doctor, compare plan vs measured, build the report.

Flow: RunConfig -> predict_memory (budget.py) ; Engine's RunResult -> compare_memory -> doctor_findings
(checks/) -> diagnose() -> Diagnosis (frozen). The comparison's bases are enums; report/ chooses the words.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from .checks import Finding, Severity, build_context, run_checks
from .errors import LoraDoctorError
from .measure import RunResult
from .runconfig import RunConfig

LABEL_SAMPLE = 64
"""Tokenized examples whose labels the doctor inspects (all-labels-masked, EOS kept)."""
CPU_COMPARABLE_BYTES = 256 * 2**20
"""Below this plan, a CPU run's RSS is mostly the runtime's own first-use allocations (CPU kernels,
allocator arenas, autograd; ~100-200 MiB measured on the tiny examples), not the tensors the plan counts."""


class MemoryBasis(Enum):
    """What the one measured peak held against the plan is."""

    CUDA_ALLOCATED = "cuda_allocated"
    """torch.cuda.max_memory_allocated over load + train: tensors only."""
    CPU_TENSOR_PEAK = "cpu_tensor_peak"
    """Exact peak of live CPU tensor bytes over load + train (tensorpeak.py): CUDA's allocated peak, on CPU."""
    CPU_RSS_DELTA = "cpu_rss_delta"
    """Process RSS added by load + train, sampled (when the tensor peak was not tracked)."""
    RSS_UNAVAILABLE = "rss_unavailable"
    NOTHING_MEASURED = "nothing_measured"


class PlanBasis(Enum):
    """Which plan figure is held against the measurement: both leave out plan's runtime-overhead term."""

    CPU_WITHOUT_CUDA_OVERHEAD = "cpu_without_cuda_overhead"
    """A CPU run has no CUDA context or caching allocator."""
    CUDA_TENSORS_ONLY = "cuda_tensors_only"
    """torch's allocated peak counts tensors only; the reserved and NVML rows get the overhead back."""


@dataclass(frozen=True)
class Prediction:
    """plan's prediction for a run config (budget.py), or why there is none."""

    shape: object = None
    """introspect's ModelShape."""
    budget: object = None
    """budget.MemoryBudget."""
    total_bytes: int | None = None
    """The primary method's total, runtime overhead included."""
    terms: dict = field(default_factory=dict)
    """Term name -> bytes of the primary method (budget.TERMS)."""
    error: str | None = None
    """Why the plan is unavailable (the planner's LoraDoctorError message)."""

    @classmethod
    def from_budget(cls, shape, budget) -> "Prediction":
        from .budget import TERMS

        m = budget.primary_method
        return cls(shape, budget, m.total_bytes, {name: getattr(m, name) for name, _ in TERMS})


@dataclass(frozen=True)
class MemoryComparison:
    """The measured peak next to the plan figure that counts the same things."""

    device: str
    """'cpu' or 'cuda'."""
    measured_basis: MemoryBasis
    measured_bytes: int | None
    measured: dict
    """Counter name -> peak bytes: peak_tensor_bytes and peak_rss_bytes on CPU; allocated, reserved and NVML on
    CUDA."""
    planned_bytes: int | None = None
    planned_terms: dict | None = None
    planned_basis: PlanBasis | None = None
    planned_with_overhead_bytes: int | None = None
    """The plan with its runtime overhead (CUDA context + allocator slack)."""
    planned_by_measure: dict | None = None
    """CUDA: each counter with the plan figure that counts the same things."""
    plan_error_pct: float | None = None
    """100 * (planned - measured) / measured; None when not computed."""
    plan_too_small: bool = False
    """Held against RSS (no tensor peak) below CPU_COMPARABLE_BYTES: RSS is mostly the runtime's own, so no plan
    error is computed. The exact tensor peak has no such floor."""


@dataclass(frozen=True)
class Diagnosis:
    """The doctor's verdict on one run."""

    findings: tuple[Finding, ...]
    report: dict
    """The result dict in the doctor's schema (report/run.py)."""
    memory: MemoryComparison | None = None
    prediction: Prediction | None = None


def predict_memory(cfg: RunConfig, device: str | None = None, world_size: int = 1,
                   strategy: str | None = None) -> Prediction:
    """plan's prediction for this config (budget.py) on `device` ('cpu', 'cuda'; None: RunConfig.train_spec's
    reading of train.device), per GPU under `strategy` ('ddp'/'fsdp') with `world_size` processes (sharding.py,
    as plan --gpus N --strategy prints it); a Prediction with `error` when the planner refuses."""
    from .budget import memory_budget
    from .introspect import load_shape, resolve_targets

    try:
        shape, _ = load_shape(cfg.model, trust_remote_code=cfg.trust_remote_code)
        targets = resolve_targets(shape, cfg.lora.targets)
        budget = memory_budget(shape, cfg.lora, cfg.quant, cfg.train_spec(device), targets)
        if world_size > 1 and strategy is not None:
            from .sharding import per_gpu_budget

            budget = per_gpu_budget(budget, shape, world_size, strategy)
    except LoraDoctorError as e:
        return Prediction(error=e.message)
    return Prediction.from_budget(shape, budget)


def measured_peak_bytes(result: RunResult) -> tuple[int | None, MemoryBasis]:
    """The one measured number to hold against the plan, and what it is."""
    phases = [p for p in (result.memory.get("load"), result.memory.get("train")) if p is not None]
    if not phases:
        return None, MemoryBasis.NOTHING_MEASURED
    if phases[0].device == "cuda":
        vals = [p.peak_allocated_bytes for p in phases if p.peak_allocated_bytes is not None]
        return (max(vals) if vals else None), MemoryBasis.CUDA_ALLOCATED
    tensor_peaks = [p.peak_tensor_bytes for p in phases if p.peak_tensor_bytes is not None]
    if tensor_peaks:
        return max(tensor_peaks), MemoryBasis.CPU_TENSOR_PEAK
    return rss_delta_bytes(phases)


def rss_delta_bytes(phases: list) -> tuple[int | None, MemoryBasis]:
    """The RSS load + train added (MemoryStats of each phase), sampled."""
    start = phases[0].start_rss_bytes
    peaks = [p.peak_rss_bytes for p in phases if p.peak_rss_bytes is not None]
    if start is None or not peaks:
        return None, MemoryBasis.RSS_UNAVAILABLE
    return max(peaks) - start, MemoryBasis.CPU_RSS_DELTA


def planned_for_device(prediction: Prediction | None, device: str) -> tuple[int | None, dict | None, PlanBasis | None]:
    """(planned bytes, planned terms, basis) to hold against what a run on `device` measured.

    The measured figure is tensors only: torch.cuda.max_memory_allocated on CUDA, the exact tensor peak on CPU.
    Neither holds plan's runtime-overhead term (CUDA context + caching-allocator slack), so it is left
    out; on CUDA the reserved and NVML rows are held against the plan with that overhead (planned_by_measure).
    """
    if prediction is None or prediction.total_bytes is None:
        return None, None, None
    total, terms = prediction.total_bytes, dict(prediction.terms)
    if terms.get("runtime_overhead_bytes"):
        overhead = terms.pop("runtime_overhead_bytes")
        basis = PlanBasis.CPU_WITHOUT_CUDA_OVERHEAD if device == "cpu" else PlanBasis.CUDA_TENSORS_ONLY
        return total - overhead, terms, basis
    return total, terms, None


def planned_by_measure(total_bytes: int, planned_tensors: int) -> dict:
    """Each CUDA measurement with the plan figure that counts the same things (budget.runtime_overhead_bytes):
    allocated = tensors; reserved = tensors + allocator slack; NVML used = + the CUDA context."""
    from .budget import CUDA_CONTEXT_BYTES

    return {"peak_allocated_bytes": planned_tensors,
            "peak_reserved_bytes": max(planned_tensors, total_bytes - CUDA_CONTEXT_BYTES),
            "nvml_peak_used_bytes": total_bytes}


def compare_memory(prediction: Prediction | None, result: RunResult) -> MemoryComparison:
    """Plan vs measured for one run."""
    measured, basis = measured_peak_bytes(result)
    phase = result.memory.get("train") or result.memory.get("load")
    if phase is not None and phase.device == "cuda":
        block = {"peak_allocated_bytes": measured,
                 "peak_reserved_bytes": max((p.peak_reserved_bytes or 0) for p in result.memory.values()) or None,
                 "nvml_peak_used_bytes": max((p.nvml_peak_used_bytes or 0) for p in result.memory.values()) or None}
    elif basis is MemoryBasis.CPU_TENSOR_PEAK:  # RSS as the second row
        phases = [p for p in (result.memory.get("load"), result.memory.get("train")) if p is not None]
        block = {"peak_tensor_bytes": measured, "peak_rss_bytes": rss_delta_bytes(phases)[0]}
    else:
        block = {"peak_rss_bytes": measured}
    planned, terms, plan_basis = planned_for_device(prediction, result.model.device)
    if planned is None:
        return MemoryComparison(result.model.device, basis, measured, block)
    too_small = basis is MemoryBasis.CPU_RSS_DELTA and planned < CPU_COMPARABLE_BYTES
    error = round(100.0 * (planned - measured) / measured, 1) if measured and not too_small else None
    return MemoryComparison(
        result.model.device, basis, measured, block, planned, terms, plan_basis,
        prediction.total_bytes if plan_basis else None,
        planned_by_measure(prediction.total_bytes, planned) if plan_basis is PlanBasis.CUDA_TENSORS_ONLY else None,
        error, too_small and bool(measured))


def doctor_findings(cfg: RunConfig, engine, result: RunResult | None, prediction: Prediction | None,
                    env: dict | None) -> list[Finding]:
    """The doctor's catalogue (checks.run_checks) on everything this run knows."""
    ctx = build_context(
        config=cfg, shape=prediction.shape if prediction else None, model_config=engine.base_config,
        tokenizer=engine.tokenizer, data_stats=engine.data.stats,
        labels=[e.labels for e in engine.data.examples[:LABEL_SAMPLE]],  # one example each, as check reads them
        budget=prediction.budget if prediction else None, env=env, run=result, model=engine.peft_model)
    return list(run_checks(ctx))


def eval_loss_summary(eval_losses) -> dict:
    """The eval cross-entropy at a glance: first, last and best (lowest) with their steps; {} without eval."""
    points = [(int(s), float(v)) for s, v in eval_losses or () if v == v]  # NaN (empty eval batch) dropped
    if not points:
        return {}
    best_step, best = min(points, key=lambda p: p[1])
    return {"eval_loss_first": points[0][1], "eval_loss_last": points[-1][1], "eval_loss_best": best,
            "eval_loss_best_step": best_step, "eval_loss_last_step": points[-1][0], "eval_points": len(points)}


def _device_peak_flops(device: str) -> float | None:
    """Dense bf16 peak of the CUDA card this process ran on, from the GPU table; None on CPU or an unknown card."""
    import torch

    from .hardware import peak_bf16_flops_for

    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    return peak_bf16_flops_for(torch.cuda.get_device_name(torch.cuda.current_device()))


def _flops_per_token(cfg: RunConfig, shape) -> float | None:
    """Training FLOPs per token for this config (flops.py), attention priced at data.max_length; None if the
    targets do not resolve (the plan already says why)."""
    from . import flops
    from .introspect import resolve_targets
    from .targets import match_targets

    try:
        groups = match_targets(shape, resolve_targets(shape, cfg.lora.targets)).groups
    except LoraDoctorError:
        return None
    seq_len = cfg.data.max_length
    f = flops.step_flops(shape, cfg.lora.r, groups, seq_len=seq_len, batch=1, grad_ckpt=cfg.train.grad_ckpt)
    return f.total_flops / seq_len


def run_eta(cfg: RunConfig, engine, result: RunResult, prediction: Prediction | None) -> dict:
    """The full run's ETA from the measured median step time and train's configured steps or epochs
    (engine.total_steps), and the MFU that step time implies on a card with a known peak.

    Keys go into the report's `extra`: full_run_steps, full_run_eta_s, and implied_mfu (with the FLOPs per token
    it rests on), or mfu_note saying why there is none (CPU: no peak FLOP/s, so MFU is not meaningful).
    """
    from . import flops

    step_s = result.throughput.median_step_time_s
    if engine is None or not step_s:
        return {}
    out = {"full_run_steps": engine.total_steps, "full_run_eta_s": engine.total_steps * step_s}
    peak = _device_peak_flops(result.model.device)
    if peak is None:
        out["mfu_note"] = ("no peak FLOP/s for this device (CPU, or a card not in the GPU table): MFU is not "
                           "meaningful here" if result.model.device.startswith("cuda") else
                           "CPU run: no peak FLOP/s, MFU is not meaningful")
        return out
    per_token = _flops_per_token(cfg, prediction.shape) if prediction and prediction.shape else None
    rest = result.steps[1:] or result.steps
    tokens_per_step = sum(s.tokens for s in rest) / len(rest) if rest else 0
    mfu = flops.implied_mfu(per_token * tokens_per_step, step_s, peak) if per_token else None
    if mfu is not None:
        out.update(implied_mfu=mfu, flops_per_token=per_token, peak_bf16_flops=peak)
    return out


def out_of_memory_finding(oom) -> Finding:
    """The error finding for a run that stopped itself: out of memory, or data it refused (engine.BadData.code)."""
    return Finding(Severity.ERROR, getattr(oom, "code", "out-of-memory"), oom.message, oom.hint or "")


def diagnose(kind: str, cfg: RunConfig, engine, result: RunResult | None, *, extra: dict | None = None,
             findings_first: tuple[Finding, ...] = (), env: dict | None = None) -> Diagnosis:
    """Predict, compare, run the doctor and build the report for one finished (or failed) run.

    Args:
        engine: the Engine that ran; None when it failed before the model was loaded.
        result: its RunResult, None when nothing was measured (OOM while loading).
        findings_first: findings the run itself raised (out-of-memory), reported before the doctor's.
    """
    from .environment import collect_environment
    from .report.memory import run_report

    env = env if env is not None else collect_environment()
    if result is None:
        findings = tuple(findings_first)
        return Diagnosis(findings, run_report(kind, cfg, None, findings, None, None, extra or {}, env))
    # Each rank measures its own peak: hold it against the per-GPU plan of the strategy that ran, on its device.
    prediction = (predict_memory(cfg, engine.device, engine.world_size, engine.placement.strategy)
                  if engine is not None else predict_memory(cfg))
    comparison = compare_memory(prediction, result)
    findings = (*findings_first, *doctor_findings(cfg, engine, result, prediction, env))
    extra = dict(extra or {})
    extra.update(run_eta(cfg, engine, result, prediction))
    if result.stopped_early == "signal":
        extra["stopped_early"] = (f"interrupted (Ctrl-C/SIGTERM) after step {engine.step} of {engine.total_steps}; "
                                  "a checkpoint was saved, train --resume continues")
    report = run_report(kind, cfg, result, findings, prediction, comparison, extra, env)
    return Diagnosis(findings, report, comparison, prediction)


def write_reports(report: dict, cfg: RunConfig, kind: str) -> list[Path]:
    """JSON + Markdown under output.reports_dir, atomically."""
    from .report.run import default_report_path, write_result

    json_path = default_report_path(kind, cfg.model, ".json", cfg.output.reports_dir)
    return write_result(report, json_path=json_path, markdown_path=json_path.with_suffix(".md"))
