"""A ModelShape written by hand, for budget arithmetic that must not depend on the meta build."""

from __future__ import annotations

from lora_doctor.shape import LeafGroup, ModelShape


def hand_shape(**kw) -> ModelShape:
    """Mistral-7B by hand: 32 layers, h 4096, GQA 8 KV heads, V 32000; `kw` overrides any ModelShape field."""
    h, inter, layers, heads, kv, vocab = 4096, 14336, 32, 32, 8, 32000
    leaves = tuple(
        LeafGroup(n, "Linear", i, o, False, layers, True, True)
        for n, i, o in [("q_proj", h, h), ("k_proj", h, kv * 128), ("v_proj", h, kv * 128), ("o_proj", h, h),
                        ("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)]
    ) + (LeafGroup("lm_head", "Linear", h, vocab, False, 1, False, False),)
    base = dict(model_id="hand/mistral", source="hand", model_type="mistral", architecture="MistralForCausalLM",
                num_layers=layers, hidden_size=h, intermediate_size=inter, num_attention_heads=heads,
                num_kv_heads=kv, head_dim=128, vocab_size=vocab, tie_word_embeddings=False,
                total_params=sum(g.weight_numel for g in leaves) + vocab * h + (2 * layers + 1) * h,
                embedding_params=vocab * h, leaves=leaves, other_params=(2 * layers + 1) * h)
    base.update(kw)
    return ModelShape(**base)
