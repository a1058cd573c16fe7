"""ModelShape: everything `plan` needs to know about a model, read off a meta-device build.

Produced by introspect.py, consumed by budget.py, checks/ and report.py. Plain numbers only, so
budget arithmetic never touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class LeafGroup:
    """All Linear/Conv1D leaves that share a leaf name and shape, e.g. 32x `q_proj` 4096->4096."""

    name: str
    """Leaf name as peft matches it ('q_proj', 'c_attn', 'query_key_value', 'lm_head')."""
    kind: str
    """'Linear' or 'Conv1D' (transformers.pytorch_utils.Conv1D, stored transposed)."""
    in_features: int
    out_features: int
    bias: bool
    count: int
    """How many modules in the model carry this leaf name and shape."""
    quantizable: bool
    """True if transformers' bitsandbytes integration replaces it with Linear4bit (lm_head is skipped)."""
    default_target: bool
    """True if peft's 'all-linear' would target it (every Linear/Conv1D leaf except the output layer)."""
    tied: bool = False
    """Weight shared with the input embedding (tied lm_head): its elements are counted in embedding_params."""
    paths: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """Full module names, e.g. 'model.layers.0.self_attn.q_proj', for peft-style suffix matching."""

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def bias_numel(self) -> int:
        return self.out_features * self.count if self.bias else 0


@dataclass(frozen=True)
class ParamGroup:
    """Bare nn.Parameters that LoRA can adapt only through peft's `target_parameters`.

    In transformers 5 these are fused 3-D MoE expert tensors (Mixtral `experts.gate_up_proj` (E, 2I, H),
    `experts.down_proj` (E, H, I)) and MoE router weights (`gate.weight` (E, H)). They are not Linear modules:
    bitsandbytes leaves them in 16 bit and peft's LoRA on them allows no DoRA and no dropout.
    Their elements are counted in ModelShape.other_params.
    """

    name: str
    """Owning module's leaf name + parameter name, as peft's target_parameters matches it ('experts.down_proj')."""
    num_experts: int
    """Leading expert dimension; 1 for a 2-D parameter such as a router weight."""
    in_features: int
    out_features: int
    count: int
    """How many layers carry this tensor."""
    all_linear: bool = False
    """True if peft's 'all-linear' adapts it (peft 0.21 remaps 'all-linear' onto v5 MoE parameters)."""
    rank_multiplier: int = 1
    """peft's rank_pattern factor under 'all-linear' (2 for gate_up_proj: the fused w1+w3 get 2r, alpha 2x)."""
    paths: tuple[str, ...] = field(default=(), compare=False, repr=False)
    """Full parameter names, e.g. 'model.layers.0.mlp.experts.down_proj'."""

    @property
    def numel(self) -> int:
        return self.num_experts * self.in_features * self.out_features * self.count


@dataclass(frozen=True)
class ModelShape:
    model_id: str
    source: str
    """Where the config came from: 'local directory', 'HF cache', 'hub (config only)', 'shipped config'."""
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    total_params: int
    """Unique parameter elements of the base model (tied weights once), as peft's 'all params' before LoRA."""
    embedding_params: int
    """Elements in input embeddings (and position embeddings)."""
    leaves: tuple[LeafGroup, ...]
    """Every Linear/Conv1D leaf group, lm_head included."""
    other_params: int
    """Elements in everything that is neither a leaf weight/bias nor an embedding: norms, router scales, fused expert tensors."""
    num_experts: int | None = None
    experts_per_token: int | None = None
    extra: dict = field(default_factory=dict, compare=False)
    """Architecture-specific numbers (e.g. sliding_window) for the activation model."""
    param_groups: tuple[ParamGroup, ...] = ()
    """Expert tensors and router weights peft can reach only via target_parameters; counted in other_params."""
    embeddings: tuple[LeafGroup, ...] = ()
    """nn.Embedding groups (kind 'Embedding', in_features=num_embeddings, out_features=embedding_dim); their
    elements are embedding_params. Not quantized, not default targets."""

    @property
    def leaf_params(self) -> int:
        """Elements in leaf weights and biases, a tied lm_head's weight once (it lives in embedding_params).

        total_params == leaf_params + embedding_params + other_params.
        """
        return sum((0 if g.tied else g.weight_numel) + g.bias_numel for g in self.leaves)

    @property
    def leaf_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for g in self.leaves:
            seen.setdefault(g.name, None)
        return tuple(seen)

    @property
    def quantizable_weight_numel(self) -> int:
        return sum(g.weight_numel for g in self.leaves if g.quantizable)
