"""A cold `plan` without torch, transformers modelling or peft: shape and counts by arithmetic.

Importing torch, transformers' model class and peft is nearly all of a cold plan's time (issue 13: the meta build and
the counting itself take 0.13 s of about 4 s). For the model types of fastfamilies.FAMILIES (llama, mistral, qwen2,
qwen3, phi3, gemma2; 70B and 72B included) and GPT-2 ModelShape comes from config.json (fastfamilies.decoder_shape,
fastgpt2.gpt2_shape),
and peft's counts follow from it: LoRA adds r x (in + out) per wrapped Linear (peft tuners/lora/layer.py: lora_A
(r, in), lora_B (out, r)), DoRA one magnitude vector of `out` per wrapped Linear (lora/dora.py), and peft's "all
params" is the base plus those. tests/test_fastshape.py checks the shape field by field against the meta build and
the counts against peft over every shipped config of those types and variants.

Anything else falls back to the full path (None here): another model_type or a config fastfamilies cannot prove, a quantization_config, remote code,
targets other than presets or exact leaf names, modules_to_save or trainable tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from .fastfamilies import FAMILIES, decoder_shape
from .fastgpt2 import gpt2_shape
from .shape import ModelShape
from .specs import LoraSpec

LLAMA_DEFAULTS = FAMILIES["llama"].defaults
"""transformers LlamaConfig.__init__ defaults (models/llama/configuration_llama.py) for keys a config.json may
omit; None means derived (kv heads = heads, head_dim = hidden / heads). A test compares them with LlamaConfig()."""


def llama_shape(raw: dict, *, model_id: str, source: str) -> ModelShape | None:
    """The ModelShape meta.model_shape reads off LlamaForCausalLM, from config.json alone; None if not plain Llama."""
    if raw.get("model_type") != "llama":
        return None
    return decoder_shape(raw, model_id=model_id, source=source)


def lora_counts(shape: ModelShape, targets, lora: LoraSpec, ranks: list[int]) -> list[tuple[int, int, int]]:
    """(r, trainable, all params) per rank as peft counts Linear targets: r x (in + out) per wrapped module, plus
    `out` per module for DoRA's magnitude. `targets` is a MatchedTargets of Linear leaves only."""
    out = []
    for r in ranks:
        trainable = sum(n * (r * (g.in_features + g.out_features) + (g.out_features if lora.use_dora else 0))
                        for g, n in targets.groups)
        out.append((r, trainable, shape.total_params + trainable))
    return out


def _fast_targets(shape: ModelShape, requested):
    """MatchedTargets without peft, for presets and exact leaf names (peft's suffix rule wraps every module of a
    group whose leaf name is the target, and no other); None for anything else (regex, dotted or embedding names)."""
    from .targets import PRESETS, MatchedTargets, resolve_targets, split_targets

    items = split_targets(requested)
    names_here = {g.name for g in shape.leaves if g.default_target}  # lm_head (maybe tied): the full path
    if not items or not all(i in PRESETS or i in names_here for i in items):
        return None
    presets = [i for i in items if i in PRESETS]
    names = list(resolve_targets(shape, presets)) if presets else []
    names = tuple(dict.fromkeys([*names, *(i for i in items if i not in PRESETS)]))
    if not all(n in names_here for n in names):
        return None
    return MatchedTargets(names, [(g, g.count) for g in shape.leaves if g.name in names])


def fast_inputs(model: str, lora: LoraSpec, ranks: list[int], trust_remote_code: bool = False):
    """(shape, location, source, targets, counts) for a config of a fastfamilies.FAMILIES type found locally, else
    None (full path).

    Raises:
        LoraDoctorError: what resolve.locate_config and configcheck.check_sizes raise, as the full path would.
    """
    from .configcheck import check_sizes
    from .resolve import locate_config

    if lora.modules_to_save or lora.trainable_token_indices:
        return None
    located = locate_config(model)
    if located is None:
        return None
    path, source = located
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the full path words the error
    if not isinstance(raw, dict):
        return None
    check_sizes(raw, Path(path))
    shape = (decoder_shape(raw, model_id=model.strip(), source=source)
             or gpt2_shape(raw, model_id=model.strip(), source=source))
    targets = _fast_targets(shape, lora.targets) if shape is not None else None
    if targets is None:
        return None
    return shape, str(path), source, targets, lora_counts(shape, targets, lora, ranks)
