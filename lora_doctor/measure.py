"""Measuring, separate from presenting: peak memory, gradient flow per adapter, loss movement, speed.

Everything here returns frozen dataclasses of plain numbers (bytes as ints, seconds as floats, None
when a quantity was not measurable on this machine); report/run.py and checks/ read them. The
collectors (MemoryMonitor; gradflow.GradFlowRecorder) are the only stateful pieces.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

from .gradflow import GradFlow, GradFlowRecorder, ModuleGradFlow  # noqa: F401  (gradflow.py; RunResult carries a GradFlow)

# --- memory ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryStats:
    """Peak memory of one phase ('load', 'train', 'eval')."""

    phase: str
    device: str
    """'cuda' or 'cpu'."""
    peak_allocated_bytes: int | None = None
    """torch.cuda.max_memory_allocated during the phase (tensors); None on CPU."""
    peak_reserved_bytes: int | None = None
    """torch.cuda.max_memory_reserved during the phase (caching allocator); None on CPU."""
    nvml_peak_used_bytes: int | None = None
    """Peak device memory used as NVML saw it (all processes, CUDA context included); sampled."""
    peak_rss_bytes: int | None = None
    """Peak resident set size of this process during the phase (sampled with psutil)."""
    start_rss_bytes: int | None = None
    """RSS when the phase started; peak_rss_bytes - start_rss_bytes is what the phase added."""
    peak_tensor_bytes: int | None = None
    """CPU: exact peak of live tensor bytes (tensorpeak.TensorPeakTracker), the tensors alive at the start (model,
    optimizer state) included: what max_memory_allocated counts on CUDA. None on CUDA or when not tracked."""
    start_tensor_bytes: int | None = None
    """CPU: live tensor bytes under the phase's roots when it started."""
    duration_s: float | None = None

    @property
    def rss_delta_bytes(self) -> int | None:
        if self.peak_rss_bytes is None or self.start_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.start_rss_bytes

    @property
    def peak_bytes(self) -> int | None:
        """The number to compare with plan's prediction: CUDA peak allocated; on CPU the exact tensor peak, else
        (not tracked) the RSS the phase added."""
        if self.device == "cuda":
            return self.peak_allocated_bytes
        return self.peak_tensor_bytes if self.peak_tensor_bytes is not None else self.rss_delta_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rss_delta_bytes"] = self.rss_delta_bytes
        d["peak_bytes"] = self.peak_bytes
        return d


_PEAK_FIELDS = ("peak_allocated_bytes", "peak_reserved_bytes", "nvml_peak_used_bytes", "peak_rss_bytes",
                "peak_tensor_bytes")


def merged_memory(earlier: MemoryStats | None, later: MemoryStats) -> MemoryStats:
    """One phase measured over several windows (train's run_steps calls): the larger peaks, the first start,
    the summed time. A peak one window did not see (None) does not hide the other's."""
    if earlier is None:
        return later
    peaks = {f: max((v for v in (getattr(earlier, f), getattr(later, f)) if v is not None), default=None)
             for f in _PEAK_FIELDS}
    return MemoryStats(phase=later.phase, device=later.device, start_rss_bytes=earlier.start_rss_bytes,
                       start_tensor_bytes=earlier.start_tensor_bytes, duration_s=(earlier.duration_s or 0) + (later.duration_s or 0), **peaks)


def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


class MemoryMonitor:
    """Peak memory per phase. CUDA: allocator peaks (reset per phase) + NVML; CPU: the exact live-tensor peak
    (tensorpeak.py) and sampled process RSS.

    `ru_maxrss` cannot be reset, so the RSS peak comes from a sampling thread (every `interval_s`);
    a spike shorter than the interval (20 ms; shorter costs the training loop measurable GIL time) can be
    missed, which is why the RSS figure is a lower bound. CUDA allocator peaks and the CPU tensor peak are exact.

    Args:
        tensor_peak: on CPU, track live tensor bytes with a TorchDispatchMode (a Python call per aten op).
    """

    def __init__(self, device: str = "cpu", interval_s: float = 0.02, tensor_peak: bool = True):
        import psutil

        self.device = device
        self.interval_s = interval_s
        self.tensor_peak = tensor_peak and device == "cpu"
        self._tracker = None
        self._roots: Callable[[], Iterable] | None = None
        self._start_tensor: int | None = None
        self._proc = psutil.Process()
        self._nvml = _nvml_handle() if device == "cuda" else None
        if self._nvml is not None:
            weakref.finalize(self, _nvml_shutdown)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._phase: str | None = None
        self._peak_rss = 0
        self._peak_nvml: int | None = None
        self._start_rss = 0
        self._t0 = 0.0

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self._peak_rss:
            self._peak_rss = rss
        if self._nvml is not None:
            try:
                from .hardware import nvml_used_bytes

                self._peak_nvml = max(self._peak_nvml or 0, nvml_used_bytes(self._nvml))
            except Exception:  # NVML can vanish mid-run (driver reset); the allocator numbers remain.
                self._nvml = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self, phase: str, roots: Callable[[], Iterable] | None = None) -> None:
        """Begin a phase. `roots` returns what holds the tensors alive before it (the model, the optimizer; None
        entries skipped): on CPU their storages are the tensor peak's baseline, as CUDA's counter holds them."""
        if self._thread is not None or self._tracker is not None:
            self.stop()
        self._phase = phase
        self._roots = roots
        if self.tensor_peak:
            from .tensorpeak import TensorPeakTracker

            self._tracker = TensorPeakTracker("cpu")
            self._start_tensor = self._tracker.add_roots(roots() if roots else ())
            self._tracker.__enter__()
        self._start_rss = self._proc.memory_info().rss
        self._peak_rss = self._start_rss
        self._peak_nvml = None
        if self.device == "cuda" and _cuda_ok():
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._sample()
        self._stop.clear()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._loop, name=f"lora-doctor-mem-{phase}", daemon=True)
        self._thread.start()

    def stop(self) -> MemoryStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._sample()
        allocated = reserved = tensor_peak = None
        if self._tracker is not None:
            tracker, self._tracker = self._tracker, None
            tracker.__exit__(None, None, None)
            # What the phase built without an aten op seeing it (weights read from a safetensors mmap) is live now.
            tracker.add_roots(self._roots() if self._roots else ())
            tensor_peak = tracker.peak_bytes
        if self.device == "cuda" and _cuda_ok():
            import torch

            torch.cuda.synchronize()
            allocated = int(torch.cuda.max_memory_allocated())
            reserved = int(torch.cuda.max_memory_reserved())
        return MemoryStats(phase=self._phase or "?", device=self.device, peak_allocated_bytes=allocated,
                           peak_reserved_bytes=reserved, nvml_peak_used_bytes=self._peak_nvml,
                           peak_rss_bytes=self._peak_rss, start_rss_bytes=self._start_rss,
                           peak_tensor_bytes=tensor_peak,
                           start_tensor_bytes=self._start_tensor if tensor_peak is not None else None,
                           duration_s=time.perf_counter() - self._t0)

    def current_peak(self) -> int | None:
        """The peak so far in this phase (for OOM messages)."""
        if self.device == "cuda" and _cuda_ok():
            import torch

            return int(torch.cuda.max_memory_allocated())
        if self._tracker is not None:
            return self._tracker.peak_bytes
        return self._peak_rss - self._start_rss


def _nvml_shutdown() -> None:
    from .hardware import nvml_release

    nvml_release()


def _nvml_handle():
    """The NVML handle of the current CUDA device, or None when NVML is unavailable.

    The NVML open (hardware.nvml_acquire) is held while a handle is out: released now when none is found, else
    by `_nvml_shutdown` when the caller's monitor is garbage-collected or the interpreter exits.
    """
    if not _cuda_ok():
        return None
    import torch

    from .hardware import nvml_acquire, nvml_handle_for_cuda_device

    nv = nvml_acquire()
    if nv is None:
        return None
    index = torch.cuda.current_device()
    handle = nvml_handle_for_cuda_device(nv, index, torch.cuda.get_device_properties(index),
                                         os.environ.get("CUDA_VISIBLE_DEVICES"))
    if handle is None:
        _nvml_shutdown()
    return handle


# --- loss and speed --------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step."""

    step: int
    """1-based optimizer step."""
    loss: float
    """Training loss (the configured kind), mean over the step's micro-batches and label tokens."""
    lr: float
    """Learning rate used for this step."""
    grad_norm: float | None
    """Total adapter gradient L2 norm before clipping."""
    tokens: int
    """Tokens processed in the step (attention mask sum, all micro-batches, this process)."""
    label_tokens: int
    """Tokens with a label (not -100): what the loss averages over."""
    step_time_s: float
    epoch: float
    eval_loss: float | None = None
    """Plain cross-entropy on the eval set, when evaluated at this step."""

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.step_time_s if self.step_time_s > 0 else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tokens_per_s"] = self.tokens_per_s
        return d


NOT_MOVING_REL = 0.01
"""Relative change below which a loss counts as 'not moving' (1%): LossStats and checks/probe.py."""
ZERO_LOSS = 1e-6
"""A loss this close to 0 on real text means nothing is scored (a fully masked batch gives exactly 0 in
peft/transformers) or labels leak into the inputs."""


@dataclass(frozen=True)
class LossStats:
    n_steps: int
    first: float | None
    last: float | None
    min: float | None
    mean: float | None
    slope_per_step: float | None
    """Least-squares slope of finite losses against step; negative means learning."""
    relative_change: float | None
    """(first - last) / |first|: 0.3 means the loss fell by 30%."""
    n_nan: int
    n_inf: int
    stuck_at_zero: bool
    """Every finite loss below 1e-6: usually all labels are -100, not a perfect model."""
    not_moving: bool
    """|relative change| < 1% over the run."""

    @property
    def finite(self) -> bool:
        return self.n_nan == 0 and self.n_inf == 0

    @property
    def decreasing(self) -> bool:
        return self.relative_change is not None and self.relative_change > 0 and (self.slope_per_step or 0) < 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["finite"] = self.finite
        d["decreasing"] = self.decreasing
        return d


def loss_stats(losses: list[float]) -> LossStats:
    """Summarise a loss trace: first/last, slope, NaN/inf, stuck at zero, not moving."""
    n_nan = sum(1 for x in losses if math.isnan(x))
    n_inf = sum(1 for x in losses if math.isinf(x))
    finite = [(i, x) for i, x in enumerate(losses) if math.isfinite(x)]
    if not finite:
        return LossStats(len(losses), None, None, None, None, None, None, n_nan, n_inf, False, False)
    ys = [x for _, x in finite]
    slope = None
    if len(finite) >= 2:
        xs = [i for i, _ in finite]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in finite) / var if var else None
    first, last = ys[0], ys[-1]
    rel = (first - last) / abs(first) if first != 0 else None
    stuck = all(abs(y) < ZERO_LOSS for y in ys)
    not_moving = len(ys) >= 2 and (rel is None or abs(rel) < NOT_MOVING_REL)
    return LossStats(len(losses), first, last, min(ys), statistics.fmean(ys), slope, rel, n_nan, n_inf, stuck,
                     not_moving)


@dataclass(frozen=True)
class Throughput:
    n_steps: int
    first_step_time_s: float | None
    """Includes one-off costs (kernel selection, paged-optimizer allocation); excluded below."""
    median_step_time_s: float | None
    """Median over steps 2.. (or step 1 alone for a one-step run)."""
    tokens_per_s: float | None
    """Tokens / wall time over steps 2.. (this process)."""


def throughput(steps: list[StepRecord]) -> Throughput:
    if not steps:
        return Throughput(0, None, None, None)
    rest = steps[1:] or steps
    t = sum(s.step_time_s for s in rest)
    return Throughput(len(steps), steps[0].step_time_s, statistics.median(s.step_time_s for s in rest),
                      sum(s.tokens for s in rest) / t if t > 0 else None)


# --- the whole run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    model: str
    model_type: str
    device: str
    quant: str | None
    """'nf4', 'fp4' or None (16-bit base)."""
    base_dtype: str
    trainable_params: int
    """peft's get_nb_trainable_parameters()[0]."""
    all_params: int
    """peft's count of all parameters (4-bit weights counted at their logical size)."""
    target_modules: tuple[str, ...]
    """Leaf names peft adapted, sorted."""
    n_adapted_modules: int
    world_size: int = 1


@dataclass(frozen=True)
class RunResult:
    """What `probe` (and `train`) measured. `kind` says which; the doctor's checks read these fields."""

    kind: str
    """'probe' or 'train'."""
    config: dict
    """RunConfig.to_dict()."""
    model: ModelInfo
    data: object
    """data.DataStats (typed loosely to keep this module free of the data import)."""
    memory: dict
    """phase -> MemoryStats ('load', 'train')."""
    steps: tuple[StepRecord, ...]
    grad_flow: GradFlow
    loss: LossStats
    throughput: Throughput
    eval_losses: tuple[tuple[int, float], ...] = ()
    """(step, plain cross-entropy) pairs."""
    stopped_early: str | None = None
    """Why the run stopped before max_steps: 'signal', 'oom', or None."""
    error: str | None = None
    """An OOM (or other runtime failure) message, with the peak seen; the run's numbers are partial."""
    duration_s: float = 0.0
    extra: dict = field(default_factory=dict)
    """Free-form: predicted memory from budget.py, output paths, etc."""

    def to_dict(self) -> dict:
        data = self.data.to_dict() if hasattr(self.data, "to_dict") else self.data
        return {
            "kind": self.kind, "config": self.config, "model": asdict(self.model), "data": data,
            "memory": {k: v.to_dict() for k, v in self.memory.items()},
            "steps": [s.to_dict() for s in self.steps], "grad_flow": self.grad_flow.to_dict(),
            "loss": self.loss.to_dict(), "throughput": asdict(self.throughput),
            "eval_losses": [list(x) for x in self.eval_losses], "stopped_early": self.stopped_early,
            "error": self.error, "duration_s": self.duration_s, "extra": self.extra,
        }

