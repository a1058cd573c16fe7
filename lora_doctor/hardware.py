"""GPUs: a table of common cards, --gpu parsing, local detection, fit verdicts.

This is the only module that imports pynvml: `nvml()` opens it for everyone (measure.py and environment.py
included).

Capacity convention. GPU memory is sold in binary units with a "GB" label (JEDEC Standard 100B.01: for
memory capacity, giga = 2**30), so "24 GB" on an RTX 3090 is 24 GiB of DRAM. What a process can use is
less: ECC and the driver reserve part of it, and `nvidia-smi --query-gpu=memory.total` (= NVML
nvmlDeviceGetMemoryInfo().total, = torch.cuda.mem_get_info()[1]) reports the remainder. The table stores
that reported total as `usable_bytes`, the figure a budget must fit in; values are the totals nvidia-smi
commonly prints for each card with default ECC settings (e.g. Colab's T4 "15360MiB", AWS g5's A10G
"23028MiB"). Cards with ECC switched off or a different board variant report slightly different totals;
pass --gpu <GiB> for an exact figure, or run on the card and let detection read it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from dataclasses import dataclass, replace

from .budget import MemoryBudget, MethodBudget, method_budget
from .errors import LoraDoctorError
from .units import BYTES_PER_GIB, BYTES_PER_MIB

TIGHT_FRACTION = 0.90
"""A budget above 90% of usable memory is 'tight': the estimate's own error (activations, fragmentation)
is of that order, so such a run may or may not OOM."""


@dataclass(frozen=True)
class GPU:
    name: str
    marketed_gb: float | None
    """The vendor's "GB" figure (binary, see module docstring); None for a custom or detected size."""
    usable_bytes: int
    """Total device memory as CUDA reports it (nvidia-smi memory.total)."""
    source: str = "table"
    """'table', 'detected (NVML)', 'detected (CUDA)' or 'given (--gpu N)'."""
    peak_bf16_flops: float | None = None
    """Dense (no 2:4 sparsity) bf16 tensor-core peak in FLOP/s, fp32 accumulate, from the vendor's datasheet or
    whitepaper (sources in GPUS); None for a custom size or a card not in the table."""


def _mib(n: int) -> int:
    return n * BYTES_PER_MIB


GPUS: tuple[GPU, ...] = (
    # Peaks: dense bf16 tensor FLOP/s with fp32 accumulate, i.e. the datasheet's "with sparsity" figure halved.
    # T4 (Turing) has no bf16: its fp16 tensor peak is given, the dtype QLoRA computes in there (datasheet: 65 TF).
    GPU("T4", 16, _mib(15360), peak_bf16_flops=65e12),             # ECC on by default: 15360 MiB visible
    # A10 datasheet: 125 TF bf16 dense (250 sparse); NVIDIA publishes no separate figure for AWS's A10G.
    GPU("A10G", 24, _mib(23028), peak_bf16_flops=125e12),          # AWS g5; ECC on
    GPU("L4", 24, _mib(23034), peak_bf16_flops=121e12),            # L4 datasheet: 242 TF with sparsity; GCP g2
    # GA102 whitepaper, appendix A: bf16 tensor with fp32 accumulate 71 TF (142 sparse).
    GPU("RTX 3090", 24, _mib(24576), peak_bf16_flops=71e12),       # GDDR6X, no ECC: all 24 GiB reported
    # Ada (AD102) whitepaper, appendix A: bf16 tensor with fp32 accumulate 165.2 TF (330.4 sparse).
    GPU("RTX 4090", 24, _mib(24564), peak_bf16_flops=165.2e12),
    GPU("A100 40GB", 40, _mib(40960), peak_bf16_flops=312e12),     # A100 datasheet: 312 TF bf16 dense; SXM4
    GPU("A100 80GB", 80, _mib(81920), peak_bf16_flops=312e12),
    # H100 datasheet: SXM5 1,979 TF bf16 with sparsity -> 989.4 dense (the PCIe board: 756 dense).
    GPU("H100 80GB", 80, _mib(81559), peak_bf16_flops=989.4e12),   # SXM5 / PCIe HBM3
    GPU("H200", 141, _mib(143771), peak_bf16_flops=989.4e12),      # H200 datasheet: same 1,979 sparse as H100 SXM
)


def _norm(name: str) -> str:
    s = re.sub(r"[\s_\-]+", "", name.lower())
    s = s.replace("nvidia", "").replace("geforce", "").replace("tesla", "")
    return s.replace("gib", "gb")


_ALIASES = {
    "3090": "RTX 3090", "4090": "RTX 4090", "rtx3090": "RTX 3090", "rtx4090": "RTX 4090",
    "a10": "A10G", "h100": "H100 80GB", "h10080gb": "H100 80GB", "h100sxm": "H100 80GB", "h100pcie": "H100 80GB",
    "h200141gb": "H200", "a10040": "A100 40GB", "a10080": "A100 80GB",
    "a100sxm440gb": "A100 40GB", "a100sxm480gb": "A100 80GB", "a100pcie40gb": "A100 40GB", "a100pcie80gb": "A100 80GB",
}


def gpu_names() -> tuple[str, ...]:
    return tuple(g.name for g in GPUS)


def lookup_gpu(spec: str) -> GPU:
    """A GPU from --gpu: a table name (case, spaces and dashes ignored: 'rtx-4090', 'a100 80gb') or a size in GiB.

    Raises:
        LoraDoctorError: an unknown name, an ambiguous one ('a100') or a non-positive size.
    """
    text = str(spec).strip()
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(gib|gb|g)?", text.lower())
    if size and _norm(text) not in _ALIASES:  # '4090' is a card, '24' a size
        gib = float(size.group(1))
        if gib <= 0:
            raise LoraDoctorError(f"--gpu size must be positive, got {spec!r}.", "Try: --gpu 24 (GiB) or --gpu 'RTX 4090'")
        return GPU(f"{gib:g} GiB", None, int(gib * BYTES_PER_GIB), source="given (--gpu N)")
    key = _norm(text)
    by_norm = {_norm(g.name): g for g in GPUS}
    if key in by_norm:
        return by_norm[key]
    if key in _ALIASES:
        return by_norm[_norm(_ALIASES[key])]
    matches = [g for n, g in by_norm.items() if n.startswith(key)] if key else []
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(gpu_names())
    if len(matches) > 1:
        raise LoraDoctorError(
            f"--gpu {spec!r} is ambiguous: {', '.join(g.name for g in matches)}.",
            f"Name one, e.g. --gpu '{matches[-1].name}', or give the memory in GiB: --gpu 40",
        )
    raise LoraDoctorError(f"Unknown GPU {spec!r}.", f"Known: {names}. Or give the memory in GiB: --gpu 24")


def peak_bf16_flops_for(device_name: str) -> float | None:
    """The table's dense bf16 peak for a CUDA device name ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB');
    None for a card the table does not know."""
    try:
        return lookup_gpu(device_name).peak_bf16_flops
    except LoraDoctorError:
        key = _norm(device_name)
        # Device names carry suffixes the table omits ('HBM3', 'PCIe'): the longest table name they start with.
        known = sorted((g for g in GPUS if key.startswith(_norm(g.name))), key=lambda g: -len(_norm(g.name)))
        return known[0].peak_bf16_flops if known else None


# -- NVML ------------------------------------------------------------------------------------------------------
# nvmlInit/nvmlShutdown are reference-counted by the library, but a shutdown without its init (or one too many)
# closes NVML under another user's feet. So every open goes through one counter: the first acquire initialises,
# the last release shuts down, and nesting (a MemoryMonitor alive while detect_local_gpu runs) is safe.

_nvml_lock = threading.Lock()
_nvml_users = 0


def _pynvml():
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    return pynvml


def nvml_acquire():
    """pynvml with NVML initialised, or None (nvidia-ml-py missing, no driver). Pair with `nvml_release()`."""
    global _nvml_users
    pynvml = _pynvml()
    if pynvml is None:
        return None
    with _nvml_lock:
        if _nvml_users == 0:
            try:
                pynvml.nvmlInit()
            except Exception:  # NVMLError: no driver or no libnvidia-ml
                return None
        _nvml_users += 1
    return pynvml


def nvml_release() -> None:
    """Undo one successful `nvml_acquire()`; the last one shuts NVML down."""
    global _nvml_users
    with _nvml_lock:
        if _nvml_users == 0:
            return
        _nvml_users -= 1
        if _nvml_users == 0:
            with contextlib.suppress(Exception):
                import pynvml

                pynvml.nvmlShutdown()


@contextlib.contextmanager
def nvml():
    """`with nvml() as nv:` pynvml, initialised for the block, or None when NVML is unavailable."""
    nv = nvml_acquire()
    try:
        yield nv
    finally:
        if nv is not None:
            nvml_release()


def nvml_handle_for_cuda_device(nv, index: int, props, visible: str | None):
    """The NVML handle of CUDA device `index` (its torch properties `props`), or None.

    NVML numbers every GPU in the machine in PCI order; CUDA only the visible ones (CUDA_VISIBLE_DEVICES, given
    as `visible`), fastest first by default. So the device is matched by PCI address, then by UUID, and a CUDA
    index is used as an NVML index only when no CUDA_VISIBLE_DEVICES remaps it.
    """
    lookups = []
    if hasattr(props, "pci_bus_id"):
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        lookups.append(lambda: nv.nvmlDeviceGetHandleByPciBusId(bus_id))
    if getattr(props, "uuid", None) is not None:
        lookups.append(lambda: nv.nvmlDeviceGetHandleByUUID(f"GPU-{props.uuid}"))
    if visible is None:
        lookups.append(lambda: nv.nvmlDeviceGetHandleByIndex(index))
    else:
        entries = [e.strip() for e in visible.split(",")]
        if index < len(entries) and entries[index].isdigit():
            lookups.append(lambda: nv.nvmlDeviceGetHandleByIndex(int(entries[index])))
    for lookup in lookups:
        try:
            return lookup()
        except Exception:
            continue
    return None


def nvml_used_bytes(handle) -> int:
    """Device memory in use by every process (nvidia-smi's figure). Raises whatever NVML raises."""
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)


def _nvml_first_gpu(nv) -> GPU | None:
    """GPU 0 as NVML reports it, None when there is none; raises NVMLError when the driver cannot answer."""
    if nv.nvmlDeviceGetCount() == 0:
        return None
    handle = nv.nvmlDeviceGetHandleByIndex(0)
    name = nv.nvmlDeviceGetName(handle)
    name = name.decode() if isinstance(name, bytes) else name
    return GPU(name, None, int(nv.nvmlDeviceGetMemoryInfo(handle).total), source="detected (NVML)")


def detect_local_gpu() -> GPU | None:
    """The first local CUDA device with its total memory, via NVML, else torch.cuda; None without a GPU."""
    if _pynvml() is not None:
        with nvml() as nv:
            if nv is None:
                # No NVIDIA driver (or no libnvidia-ml): CUDA cannot see a device either, so don't pay for torch.
                return None
            try:
                return _nvml_first_gpu(nv)
            except Exception:  # NVMLError: a driver too old for a query; ask CUDA
                pass
    try:
        import torch

        if torch.cuda.is_available():
            _, total = torch.cuda.mem_get_info(0)
            return GPU(torch.cuda.get_device_name(0), None, int(total), source="detected (CUDA)")
    except Exception:
        pass
    return None


# -- verdicts ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    gpu: str
    method: str
    total_bytes: int
    usable_bytes: int
    status: str
    """'fits', 'tight' (above TIGHT_FRACTION of usable) or 'does not fit'."""

    @property
    def fraction(self) -> float:
        return self.total_bytes / self.usable_bytes


def verdict_status(total_bytes: int, usable_bytes: int) -> str:
    if total_bytes > usable_bytes:
        return "does not fit"
    if total_bytes > TIGHT_FRACTION * usable_bytes:
        return "tight"
    return "fits"


def verdicts(budget: MemoryBudget, gpus=GPUS) -> list[Verdict]:
    """One verdict per (GPU, method), GPU-major."""
    return [
        Verdict(g.name, m.key, m.total_bytes, g.usable_bytes, verdict_status(m.total_bytes, g.usable_bytes))
        for g in gpus
        for m in budget.methods
    ]


@dataclass(frozen=True)
class Headroom:
    """What the chosen GPU allows for the primary method, other flags unchanged."""

    gpu: GPU
    method: str
    verdict: str
    total_bytes: int
    max_batch: int | None
    """Largest micro-batch at --seq-len whose budget fits usable memory; None if batch 1 does not."""
    max_seq_len: int | None
    """Largest sequence length at batch 1 that fits; None if none does."""
    seq_len_cap: int | None
    """The model's max_position_embeddings where it bounded the search."""


MAX_BATCH_SEARCH = 1 << 16
MAX_SEQ_SEARCH = 1 << 22


def _largest(fits, hi_cap: int) -> int | None:
    """Largest n in [1, hi_cap] with fits(n), for a monotone predicate: doubling, then bisection."""
    if not fits(1):
        return None
    lo = 1
    hi = 2
    while hi <= hi_cap and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, hi_cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def headroom(budget: MemoryBudget, shape, gpu: GPU, method: str | None = None, *, cost=None) -> Headroom:
    """Largest batch (at the budget's seq_len) and largest seq_len (at batch 1) that fit `gpu` for one method.

    cost(key, train) -> total bytes re-costs one method at another step shape; default: one GPU's
    budget.method_budget (sharding.per_gpu_cost gives the per-GPU figure of a multi-GPU plan).
    """
    key = method or budget.primary
    m: MethodBudget = budget.method(key)

    def total(batch: int, seq_len: int) -> int:
        train = replace(budget.train, batch=batch, seq_len=seq_len)
        if cost is not None:
            return cost(key, train)
        return method_budget(key, shape, budget.lora, budget.quant, train, budget.targets).total_bytes

    cap = shape.extra.get("max_position_embeddings") or shape.extra.get("n_positions")
    seq_cap = min(int(cap), MAX_SEQ_SEARCH) if cap else MAX_SEQ_SEARCH
    max_batch = _largest(lambda b: total(b, budget.train.seq_len) <= gpu.usable_bytes, MAX_BATCH_SEARCH)
    max_seq = _largest(lambda t: total(1, t) <= gpu.usable_bytes, seq_cap)
    return Headroom(
        gpu=gpu, method=key, verdict=verdict_status(m.total_bytes, gpu.usable_bytes), total_bytes=m.total_bytes,
        max_batch=max_batch, max_seq_len=max_seq, seq_len_cap=seq_cap if cap and max_seq == seq_cap else None,
    )
