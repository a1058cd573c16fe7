"""Gradient flow per adapter module: did every LoRA module get a gradient, and did its weights move?

`GradFlowRecorder` is the collector (stateful: it snapshots the adapter at construction); `GradFlow`
and `ModuleGradFlow` are the frozen results that measure.RunResult carries and checks/ read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .fsdp import full  # under FSDP2 gradients and their norms are DTensors: reduced across ranks


@dataclass(frozen=True)
class ModuleGradFlow:
    """Gradient and weight movement of one adapted module (e.g. 'model.layers.0.self_attn.q_proj').

    lora_A's gradient is exactly zero at the first step: B starts at zero and dL/dA = B^T (...).
    So a healthy module shows lora_B > 0 from step 1 and lora_A > 0 from step 2.
    """

    module: str
    lora_A_grad_norms: tuple[float, ...]
    """L2 norm of lora_A's gradient at each optimizer step (accumulated over micro-batches, before clipping)."""
    lora_B_grad_norms: tuple[float, ...]
    lora_A_delta_norm: float
    """||A_end - A_start||: how far the weights actually moved."""
    lora_B_delta_norm: float
    n_params: int
    """Trainable elements in this module's adapter (A + B, and DoRA's magnitude if present)."""

    @property
    def received_grad(self) -> bool:
        return any(g > 0 for g in self.lora_A_grad_norms + self.lora_B_grad_norms)

    @property
    def changed(self) -> bool:
        return self.lora_A_delta_norm > 0 or self.lora_B_delta_norm > 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["received_grad"] = self.received_grad
        d["changed"] = self.changed
        return d


@dataclass(frozen=True)
class GradFlow:
    """Gradient flow over a run: per adapter module, plus what must never receive a gradient."""

    modules: tuple[ModuleGradFlow, ...]
    frozen_params_with_grad: tuple[str, ...] = ()
    """Names of base (requires_grad=False) parameters that got a .grad: must be empty."""
    n_steps: int = 0

    @property
    def modules_without_grad(self) -> tuple[str, ...]:
        return tuple(m.module for m in self.modules if not m.received_grad)

    @property
    def modules_unchanged(self) -> tuple[str, ...]:
        return tuple(m.module for m in self.modules if not m.changed)

    @property
    def healthy(self) -> bool:
        return bool(self.modules) and not self.modules_without_grad and not self.modules_unchanged \
            and not self.frozen_params_with_grad

    def to_dict(self) -> dict:
        return {"n_steps": self.n_steps, "modules": [m.to_dict() for m in self.modules],
                "frozen_params_with_grad": list(self.frozen_params_with_grad),
                "modules_without_grad": list(self.modules_without_grad),
                "modules_unchanged": list(self.modules_unchanged), "healthy": self.healthy}


def _split_adapter_name(name: str) -> tuple[str, str] | None:
    """'base_model.model.model.layers.0.q_proj.lora_A.default.weight' -> ('model.layers.0.q_proj', 'A')."""
    for part, kind in ((".lora_A.", "A"), (".lora_B.", "B"), (".lora_magnitude_vector.", "M")):
        if part in name:
            module = name.split(part)[0]
            return module.removeprefix("base_model.model."), kind
    return None


class GradFlowRecorder:
    """Call `record()` after backward (after GradScaler.unscale_) and before clipping and optimizer.step():
    clipping scales every gradient by one factor, which would hide which modules carry the signal.
    Call `finish()` after the run.

    Snapshots the adapter weights at construction so `finish()` can report how far each one moved.
    """

    def __init__(self, model):
        import torch

        self.model = model
        self._groups: dict[str, dict[str, list]] = {}
        self._frozen: list[tuple[str, object]] = []
        for name, p in model.named_parameters():
            split = _split_adapter_name(name)
            if p.requires_grad and split is not None:
                module, kind = split
                self._groups.setdefault(module, {"A": [], "B": [], "M": []})[kind].append(p)
            elif not p.requires_grad:
                self._frozen.append((name, p))
        with torch.no_grad():
            self._start = {m: {k: [p.detach().clone() for p in ps] for k, ps in g.items()} for m, g in self._groups.items()}
        self._norms: dict[str, dict[str, list[float]]] = {m: {"A": [], "B": []} for m in self._groups}
        self._frozen_with_grad: set[str] = set()
        self.n_steps = 0

    def record(self) -> None:
        import torch

        self.n_steps += 1
        # One norm per (module, A|B), computed where the gradients live and read back with one sync
        # (a 7B all-linear adapter has ~450 of them; a .item() each would stall the GPU 450 times).
        norms = []
        for g in self._groups.values():
            for kind in ("A", "B"):
                grads = [p.grad for p in g[kind] if p.grad is not None]
                if grads:
                    norms.append(torch.linalg.vector_norm(
                        torch.stack([torch.linalg.vector_norm(x.detach().float()) for x in grads])))
                else:
                    norms.append(None)
        device = next((n.device for n in norms if n is not None), None)
        if device is None:
            values = [0.0] * len(norms)
        else:
            zero = torch.zeros((), device=device)
            values = full(torch.stack([n if n is not None else zero for n in norms])).tolist()
        i = 0
        for module in self._groups:
            self._norms[module]["A"].append(values[i])
            self._norms[module]["B"].append(values[i + 1])
            i += 2
        for name, p in self._frozen:
            if getattr(p, "grad", None) is not None:
                self._frozen_with_grad.add(name)

    def finish(self) -> GradFlow:
        import torch

        out = []
        with torch.no_grad():
            for module, g in self._groups.items():
                def delta(kind):
                    pairs = zip(g[kind], self._start[module][kind])
                    sq = sum(float(full(torch.sum((p.detach().float() - p0.float()) ** 2))) for p, p0 in pairs)
                    return math.sqrt(sq)

                out.append(ModuleGradFlow(
                    module=module, lora_A_grad_norms=tuple(self._norms[module]["A"]),
                    lora_B_grad_norms=tuple(self._norms[module]["B"]), lora_A_delta_norm=delta("A"),
                    lora_B_delta_norm=delta("B"), n_params=sum(p.numel() for ps in g.values() for p in ps)))
        return GradFlow(modules=tuple(out), frozen_params_with_grad=tuple(sorted(self._frozen_with_grad)),
                        n_steps=self.n_steps)
