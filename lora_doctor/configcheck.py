"""What a model config must describe before lora-doctor plans it: positive shapes, one causal decoder.

resolve.py calls these on every config it reads, so plan, modules, check, probe and train refuse a
degenerate or foreign config in one line before anything is built.
"""

from __future__ import annotations

from pathlib import Path

from .errors import LoraDoctorError, raise_problems

SIZE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "intermediate_size", "head_dim")
"""Shape fields a planned model needs positive; transformers' attribute_map answers GPT-2's n_embd as hidden_size."""


def check_sizes(config, path: Path) -> None:
    """Raise when a shape field is zero, negative or not an integer; absent (None) fields are the model's business.

    `config` is a PretrainedConfig or the raw config.json dict: the raw one is checked before transformers
    builds it, because some configs divide by the head count in their constructor.
    """
    problems = []
    for name in SIZE_FIELDS:
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is None:
            continue
        if isinstance(config, dict) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            continue  # a wrong type in the raw file: transformers' strict config names it better
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append((f"'{path}' has {name} = {value!r}; it must be a positive integer.",
                             f"Fix \"{name}\" in {path.name} (compare it with the model's config.json on the hub)."))
    problems += _pad_problems(config, path)
    raise_problems(problems, f"in {path.name}")


def _pad_problems(config, path: Path) -> list[tuple[str, str]]:
    """pad_token_id outside the embedding rows: most decoders pass it as nn.Embedding's padding_idx, and torch
    refuses an index outside [-vocab_size, vocab_size) (torch/nn/modules/sparse.py), so the model cannot be built."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    pad, vocab = get("pad_token_id"), get("vocab_size")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (pad, vocab)) or vocab <= 0:
        return []
    if -vocab <= pad < vocab:
        return []
    return [(f"'{path}' has pad_token_id = {pad} but vocab_size = {vocab}: the embedding has no row {pad}, so the "
             "model cannot be built.", f"Fix \"pad_token_id\" in {path.name}: null, or an id below {vocab}.")]


def check_causal_lm(config, path: Path) -> None:
    """Refuse seq2seq and encoder-only configs: the budget, the engine and the loss assume one causal decoder."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", "")
    hint = "lora-doctor plans causal LMs (decoder-only, e.g. Llama, Mistral, Qwen, GPT-2); point MODEL at one."
    if getattr(config, "is_encoder_decoder", False):
        raise LoraDoctorError(f"'{path}' describes a seq2seq (encoder-decoder) model: lora-doctor cannot build a "
                              f"causal LM for model type '{model_type}'.", hint)
    # BERT-style types have a causal class too, but only as a decoder (is_decoder); as saved they are encoders.
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False)
    # Remote-code types are unknown to the mapping by definition; their own auto_map decides.
    foreign = model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not getattr(config, "auto_map", None)
    if encoder or foreign:
        raise LoraDoctorError(f"'{path}' describes an encoder-only or non-causal model: lora-doctor cannot build a "
                              f"causal LM for model type '{model_type}'.", hint)
