"""A probe/train run as the doctor's result dict: the words for diagnose's memory bases live here."""

from __future__ import annotations

from ..diagnose import MemoryBasis, MemoryComparison, PlanBasis, Prediction, eval_loss_summary

MEASURED_WORDS = {
    MemoryBasis.CUDA_ALLOCATED: "torch.cuda.max_memory_allocated over load + train",
    MemoryBasis.CPU_TENSOR_PEAK: "tensor peak (exact) over load + train: live CPU tensor bytes, as "
                                 "max_memory_allocated counts them on CUDA",
    MemoryBasis.CPU_RSS_DELTA: "process RSS added by load + train (sampled; CPU)",
    MemoryBasis.RSS_UNAVAILABLE: "process RSS unavailable",
    MemoryBasis.NOTHING_MEASURED: "nothing measured",
}
PLAN_WORDS = {
    PlanBasis.CPU_WITHOUT_CUDA_OVERHEAD: ("plan without its CUDA-only runtime overhead (CPU run: no CUDA context "
                                          "or caching allocator)"),
    PlanBasis.CUDA_TENSORS_ONLY: ("plan without its runtime overhead (torch's allocated peak counts tensors only: "
                                  "no CUDA context, no allocator slack; those are in the reserved and NVML rows)"),
}
CPU_TOO_SMALL_NOTE = ("not computed: on CPU, below a 256 MiB plan the process RSS is mostly the runtime's own "
                      "allocations, not the tensors the plan counts")


def memory_block(c: MemoryComparison) -> dict:
    """The result's 'memory' section."""
    device = f"{c.device} — measured: {MEASURED_WORDS[c.measured_basis]}"
    memory = {"device": device + (f"; planned: {PLAN_WORDS[c.planned_basis]}" if c.planned_basis else ""),
              "measured": c.measured}
    if c.planned_basis:
        memory["planned_basis"] = c.planned_basis.value  # diagnose.PlanBasis: summary_lines picks its words
    if c.planned_bytes is not None:
        memory["planned_total_bytes"] = c.planned_bytes
        memory["planned_terms"] = c.planned_terms
        if c.planned_by_measure is not None:
            memory["planned_by_measure"] = c.planned_by_measure
        if c.plan_too_small:
            memory["plan_error_note"] = CPU_TOO_SMALL_NOTE
    return memory


def memory_extra(c: MemoryComparison, prediction: Prediction | None) -> dict:
    """The plan-vs-measured keys of the result's 'extra' section."""
    out = {"measured_peak_bytes": c.measured_bytes}
    if c.planned_bytes is not None and c.measured_bytes:
        out["planned_peak_bytes"] = c.planned_bytes
        if c.plan_too_small:
            out["plan_error_note"] = CPU_TOO_SMALL_NOTE
        elif c.plan_error_pct is not None:
            out["plan_error_pct"] = c.plan_error_pct
        if c.planned_basis:
            out["planned_basis"] = PLAN_WORDS[c.planned_basis]
            out["planned_with_cuda_overhead_bytes"] = c.planned_with_overhead_bytes
    elif prediction is not None and prediction.error:
        out["plan_unavailable"] = prediction.error
    return out


def run_extra(result, comparison: MemoryComparison, prediction: Prediction | None) -> dict:
    """Loss, speed, gradient flow and memory figures of a run, for the result's 'extra' section."""
    tp, gf = result.throughput, result.grad_flow
    extra = {
        "steps": len(result.steps), "first_loss": result.loss.first, "last_loss": result.loss.last,
        "loss_slope_per_step": result.loss.slope_per_step,
        "median_step_time_s": tp.median_step_time_s, "tokens_per_s": tp.tokens_per_s,
        "adapter_modules": len(gf.modules), "modules_without_grad": len(gf.modules_without_grad),
        "modules_unchanged": len(gf.modules_unchanged),
    }
    extra.update(memory_extra(comparison, prediction))
    extra.update(eval_loss_summary(result.eval_losses))
    if result.error:
        extra["error"] = result.error
    return extra


def run_report(kind: str, cfg, result, findings, prediction: Prediction | None,
               comparison: MemoryComparison | None, extra: dict, env: dict | None) -> dict:
    """The result dict in the doctor's schema, with the full RunResult under extra['run']."""
    from .run import build_result

    extra = dict(extra)
    model = {"id": cfg.model}
    targets = memory = None
    if result is not None:
        extra.update(run_extra(result, comparison, prediction))
        extra["run"] = result.to_dict()
        memory = memory_block(comparison)
        shape = prediction.shape if prediction else None
        model.update(model_type=result.model.model_type, source=getattr(shape, "source", None) or "local",
                     architecture=getattr(shape, "architecture", None))
        targets = {"requested": cfg.lora.targets if isinstance(cfg.lora.targets, str) else list(cfg.lora.targets),
                   "resolved": list(result.model.target_modules),
                   "trainable_params": result.model.trainable_params, "total_params": result.model.all_params}
    return build_result(kind, findings=list(findings), model={k: v for k, v in model.items() if v is not None},
                        targets=targets, memory=memory,
                        loss=[s.loss for s in result.steps] if result is not None else None,
                        data=result.data.to_dict() if result is not None else None, config=cfg.to_dict(),
                        environment=env, extra=extra)
