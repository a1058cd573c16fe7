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

    @property
    def weight_numel(self) -> int:
        return self.in_features * self.out_features * self.count

    @property
    def bias_numel(self) -> int:
        return self.out_features * self.count if self.bias else 0


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

    @property
    def leaf_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for g in self.leaves:
            seen.setdefault(g.name, None)
        return tuple(seen)

    @property
    def quantizable_weight_numel(self) -> int:
        return sum(g.weight_numel for g in self.leaves if g.quantizable)
