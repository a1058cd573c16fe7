"""FLOPs of one LoRA training step and the time it takes on a card: pure arithmetic on a ModelShape, no torch.

Accounting (one multiply-add = 2 FLOPs; per token unless said otherwise):
- Base forward: 2·N, N = the weights a token is multiplied by: every Linear / Conv1D leaf (lm_head included,
  tied or not: a tied lm_head still does its (V, H) matmul), the router, and of each fused expert tensor the
  share of experts a token is routed to (top-k / E). The input embedding is a lookup, no FLOPs. Kaplan et al.
  2020 ("Scaling Laws", sec. 2.1) and PaLM (Chowdhery et al. 2022, appendix B) count 2N the same way.
- Base backward with frozen weights: 2·N for the activation gradients, and no weight gradients (the 2·N a full
  fine-tune spends there): where the usual 6N becomes 4N.
- Attention: QKᵀ and AV are 2·T·d each per token and layer, d = heads·head_dim, so 4·T·d forward and twice that
  backward (gradients of both operands). T is the full sequence, as PaLM appendix B counts it (its 12·L·H·Q·T):
  causal masking does not halve it here; flash / sdpa kernels that skip masked blocks do about half the work, so
  this term is an upper bound for them. Layers with sliding-window attention use min(T, window).
- LoRA per adapted module of (in, out) at rank r: x·Aᵀ then ·Bᵀ is 2·r·(in + out) forward; backward is twice
  that (weight gradients of A and B, and the activation gradient through them). Expert tensors count their
  routed share, at peft's rank multiplier.
- Gradient checkpointing recomputes one forward of the decoder layers (base, attention and LoRA) during backward;
  transformers checkpoints each layer, so lm_head runs once.
Norms, activations, softmax, rotary embeddings, the loss and the optimizer step are elementwise and left out
(well under 1% at 7B sizes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .shape import ModelShape, ParamGroup

ASSUMED_MFU = 0.40
"""Model FLOPs utilisation assumed for a planned step: an assumption, not a measurement. PaLM reached 46.2% on
TPU v4 (Chowdhery et al. 2022, table 3); single-card LoRA loops with small batches, and QLoRA's nf4
dequantization before every matmul, usually do less. Measure yours with `lora-doctor probe`."""


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one optimizer micro-step (batch × seq_len tokens), by term."""

    tokens: int
    """Tokens in the step: batch × seq_len."""
    matmul_params: int
    """N: weights each token is multiplied by (see module docstring)."""
    base_forward_flops: int
    attention_forward_flops: int
    lora_forward_flops: int
    head_forward_flops: int
    """The output layer's share of base_forward_flops (2·V·H per token): outside the checkpointed layers."""
    recompute: bool
    """Gradient checkpointing: one more forward during backward."""

    @property
    def forward_flops(self) -> int:
        return self.base_forward_flops + self.attention_forward_flops + self.lora_forward_flops

    @property
    def backward_flops(self) -> int:
        # Frozen base: activation gradients only (1x forward); attention and LoRA: both operands (2x forward).
        return self.base_forward_flops + 2 * self.attention_forward_flops + 2 * self.lora_forward_flops

    @property
    def recompute_flops(self) -> int:
        return self.forward_flops - self.head_forward_flops if self.recompute else 0

    @property
    def total_flops(self) -> int:
        return self.forward_flops + self.backward_flops + self.recompute_flops

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "matmul_params": self.matmul_params,
                "base_forward_flops": self.base_forward_flops,
                "attention_forward_flops": self.attention_forward_flops,
                "lora_forward_flops": self.lora_forward_flops, "head_forward_flops": self.head_forward_flops,
                "forward_flops": self.forward_flops,
                "backward_flops": self.backward_flops, "recompute_flops": self.recompute_flops,
                "total_flops": self.total_flops}


def _routed_share(shape: ModelShape, group: ParamGroup) -> float:
    """Share of a fused expert tensor one token uses: top-k of E experts; 1 for a router or dense tensor."""
    if group.num_experts <= 1 or not shape.experts_per_token:
        return 1.0
    return min(shape.experts_per_token, group.num_experts) / group.num_experts


def matmul_params(shape: ModelShape) -> int:
    """N: weights one token is multiplied by (leaves incl. lm_head, routers, routed share of the experts)."""
    leaves = sum(g.weight_numel for g in shape.leaves)
    experts = sum(g.numel * _routed_share(shape, g) for g in shape.param_groups)
    return leaves + round(experts)


def attention_context_tokens(shape: ModelShape, seq_len: int) -> int:
    """Σ over layers of the keys each query attends to: T, or min(T, window) on sliding-window layers."""
    window = shape.extra.get("sliding_window")
    layer_types = shape.extra.get("layer_types")
    if layer_types:
        return sum(min(seq_len, window) if t == "sliding_attention" and window else seq_len for t in layer_types)
    if window and shape.extra.get("use_sliding_window", True):
        return shape.num_layers * min(seq_len, window)
    return shape.num_layers * seq_len


def attention_forward_flops_per_token(shape: ModelShape, seq_len: int) -> int:
    """4·T·d per layer (QKᵀ and AV, full T as in PaLM appendix B), d = heads × head_dim."""
    return 4 * shape.num_attention_heads * shape.head_dim * attention_context_tokens(shape, seq_len)


def lora_forward_flops_per_token(shape: ModelShape, lora_r: int, groups) -> int:
    """2·r·(in + out) per adapted module; `groups` is MatchedTargets.groups ((group, modules wrapped) pairs)."""
    total = 0.0
    for g, n in groups:
        if isinstance(g, ParamGroup):
            r = lora_r * g.rank_multiplier
            total += 2 * r * g.num_experts * (g.in_features + g.out_features) * n * _routed_share(shape, g)
        elif g.kind == "Embedding":
            total += 2 * lora_r * g.out_features * n  # lora_embedding_A is a lookup; only B multiplies
        else:
            total += 2 * lora_r * (g.in_features + g.out_features) * n
    return round(total)


def step_flops(shape: ModelShape, lora_r: int, groups, *, seq_len: int, batch: int, grad_ckpt: bool) -> StepFlops:
    """FLOPs of one LoRA step on a frozen base (module docstring has the accounting and its sources)."""
    tokens = batch * seq_len
    n = matmul_params(shape)
    return StepFlops(
        tokens=tokens,
        matmul_params=n,
        base_forward_flops=2 * n * tokens,
        attention_forward_flops=attention_forward_flops_per_token(shape, seq_len) * tokens,
        lora_forward_flops=lora_forward_flops_per_token(shape, lora_r, groups) * tokens,
        # The output embedding is the one Linear leaf outside peft's 'all-linear' (LeafGroup.default_target).
        head_forward_flops=2 * sum(g.weight_numel for g in shape.leaves if not g.default_target) * tokens,
        recompute=grad_ckpt,
    )


def step_time_s(total_flops: int, peak_flops: float | None, mfu: float = ASSUMED_MFU) -> float | None:
    """Seconds per step at `mfu` of the card's dense peak; None where the card has no published peak."""
    if not peak_flops:
        return None
    return total_flops / (peak_flops * mfu)


def implied_mfu(total_flops: int, measured_step_s: float, peak_flops: float | None) -> float | None:
    """The utilisation a measured step time implies; None without a peak (CPU, unknown card) or a time."""
    if not peak_flops or not measured_step_s or measured_step_s <= 0:
        return None
    return total_flops / measured_step_s / peak_flops
