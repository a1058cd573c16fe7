"""Mixture-of-experts: what all-linear adapts beyond the experts."""

from __future__ import annotations

from .base import Finding, Severity
from .context import CheckContext
from .registry import register

ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")
"""Router leaf names: Mixtral/Qwen-MoE 'gate', Switch/DBRX/Granite 'router', Qwen2-MoE 'shared_expert_gate'."""


def _is_router(name: str) -> bool:
    leaf = name.split(".")[0] if name.endswith((".weight", ".bias")) else name.rsplit(".", 1)[-1]
    return leaf in ROUTER_LEAVES or leaf.endswith("router")


@register
def check_router_adapted(ctx: CheckContext) -> list[Finding]:
    """all-linear on an MoE model adapts the router too: routing changes during fine-tuning (a choice)."""
    if not ctx.shape or not ctx.shape.num_experts or not ctx.resolved_targets:
        return []
    routers = [t for t in ctx.resolved_targets if _is_router(t)]
    if not routers:
        return []
    keep = [t for t in ctx.resolved_targets if t not in routers]
    return [Finding(
        Severity.INFO, "router-adapted",
        f"targets={ctx.targets!r} on a {ctx.shape.num_experts}-expert model also adapts the router "
        f"({', '.join(routers)}): fine-tuning then changes which experts each token reaches, which can unbalance "
        "expert load. Many recipes keep the router frozen.",
        f"To keep routing as pretrained: --target {','.join(keep)}. Keep all-linear if adapting routing is intended.",
    )]
