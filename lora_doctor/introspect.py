"""Exact trainable counts from peft, and the LoraConfig the engine builds; re-exports the shape and target names.

peft is applied to a copy of the meta model (meta.py) that keeps one decoder layer per distinct layer structure,
each adapter tensor counted once per layer it stands for, so its counts are the ones
`print_trainable_parameters()` prints on the real thing (tests/test_fast_counts.py checks every shipped config). Which modules a target names is targets.py (peft's own
`check_target_module_exists`); how a model is built and read is meta.py. The names below stay importable from
here for callers that plan, check and train.

Fused MoE expert tensors: peft's `LoraConfig(target_parameters=...)` refuses DoRA and lora_dropout > 0
(`peft.tuners.lora.layer.ParamWrapper.update_layer`). 'all-linear' goes to peft as the string, so its v5 MoE
rewrite (router and experts as target_parameters, 2r on gate_up_proj) and so the counts stay peft's own. The
'mlp' preset is the expert tensors at plain rank r.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from .errors import LoraDoctorError
from .meta import build_meta_model, load_shape, model_shape
from .shape import ModelShape
from .specs import LoraSpec
from .targets import (
    PRESETS,
    Coverage,
    FusedTarget,
    group_matches,
    partial_coverage,
    preset_targets,
    resolve_targets,
    split_targets,
    target_groups,
)

__all__ = [
    "PRESETS", "Coverage", "FusedTarget", "TrainableCount", "build_meta_model", "layer_representatives",
    "load_shape", "lora_config", "saved_kwargs", "model_shape", "partial_coverage", "peft_without_bitsandbytes", "preset_targets", "resolve_targets", "target_groups", "trainable_counts",
]


@dataclass(frozen=True)
class TrainableCount:
    r: int
    trainable: int
    all_params: int
    """As peft reports it: base parameters (tied once) plus adapter parameters."""

    @property
    def fraction(self) -> float:
        return self.trainable / self.all_params




# -- peft ------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def peft_without_bitsandbytes() -> Iterator[None]:
    """Inside the block, `import peft` skips bitsandbytes; on exit that peft is forgotten.

    Importing bitsandbytes is most of `import peft`'s time (its backends build torch ops), and counting on a
    meta model never quantizes. peft asks `importlib.util.find_spec("bitsandbytes")` (peft/import_utils.py
    is_bnb_available), which is None for a None entry in sys.modules, so peft imports without its bnb layers.
    That peft must not outlive the block: a later QLoRA load in the same process needs those layers, so its
    modules leave sys.modules on exit and the next `import peft` is a whole one. transformers caches its own
    answer (lru_cache on is_bitsandbytes_available), so it is asked first and keeps the true one.
    """
    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        yield  # already paid for: nothing to save and nothing to undo
        return
    from transformers.utils.import_utils import is_bitsandbytes_available

    is_bitsandbytes_available()
    sys.modules["bitsandbytes"] = None
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        for name in [n for n in sys.modules if n == "peft" or n.startswith("peft.")]:
            del sys.modules[name]


def _split_modules_and_parameters(shape: ModelShape, raw, names: tuple[str, ...]):
    """(target_modules, target_parameters, parameter target names) for peft.

    'all-linear' (or exactly the names it resolves to) goes to peft as the string, so peft applies its own
    rules, including its v5 MoE rewrite and the parameter targets it adds; anything else is split by whether
    a name matches a fused expert / router parameter.
    """
    all_linear = preset_targets(shape)["all-linear"]
    # Resolved 'all-linear' names count as 'all-linear' too, so callers may pass either form.
    if split_targets(raw) == ["all-linear"] or (len(names) == len(all_linear) and set(names) == set(all_linear)):
        return "all-linear", None, [g.name for g in shape.param_groups if g.all_linear]
    param_names = [n for n in names if any(group_matches(g, [n]) for g in shape.param_groups)]
    # An empty list, not None: None makes peft fall back to its per-model default targets.
    return [n for n in names if n not in param_names], param_names or None, param_names


def lora_config(shape: ModelShape, lora: LoraSpec, targets: str | Sequence[str] | None = None):
    """The peft LoraConfig for `lora` on this model, as the engine should build it.

    Raises:
        LoraDoctorError: bad targets, or DoRA / dropout on parameter targets, which peft's ParamWrapper refuses.
    """
    from peft import LoraConfig

    raw = lora.targets if targets is None else targets
    names = resolve_targets(shape, raw)
    target_modules, target_parameters, param_names = _split_modules_and_parameters(shape, raw, names)
    if param_names and lora.use_dora:
        raise LoraDoctorError(
            f"DoRA cannot adapt the parameter targets {', '.join(param_names)} of {shape.model_id!r} "
            "(fused MoE experts / router; peft's target_parameters supports plain LoRA only).",
            "Drop --dora (lora.use_dora: false), or target attention only: --target attn",
        )
    if param_names and lora.dropout > 0:
        raise LoraDoctorError(
            f"LoRA on the parameter targets {', '.join(param_names)} of {shape.model_id!r} does not support "
            f"dropout (got {lora.dropout}).",
            "Set --dropout 0, or target attention only: --target attn",
        )
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.dropout,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        target_modules=target_modules,
        target_parameters=target_parameters,
        task_type="CAUSAL_LM",
        **saved_kwargs(lora),
    )


def saved_kwargs(lora: LoraSpec) -> dict:
    """LoraConfig's modules_to_save / trainable_token_indices for `lora`, as peft takes them (lists, None if unset)."""
    ids = lora.trainable_token_indices
    if isinstance(ids, dict):
        ids = {name: list(v) for name, v in ids.items()}
    elif ids is not None:
        ids = list(ids)
    return {"modules_to_save": list(lora.modules_to_save) or None, "trainable_token_indices": ids}


# Adapter tensors whose size is a multiple of r (peft/tuners/lora/layer.py update_layer); anything else that
# trains (DoRA's lora_magnitude_vector) does not depend on r.
_RANK_TENSOR = re.compile(r"\.lora_(embedding_)?[AB]\.")


def _layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Outermost ModuleLists of two or more blocks (decoder layers: `model.layers`, GPT-2's `transformer.h`)."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix, _ in found):
            continue  # an expert list inside a layer: copied whole with its layer
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            found.append((name, module))
    return found


def _structure(block: nn.Module) -> tuple:
    """What decides how peft wraps a block: every module's name and class, every parameter's name, shape, dtype."""
    modules = tuple((n, type(m).__qualname__) for n, m in block.named_modules())
    params = tuple((n, tuple(p.shape), str(p.dtype)) for n, p in block.named_parameters(remove_duplicate=False))
    return modules, params


def layer_representatives(model: nn.Module) -> tuple[list[nn.Module], dict[str, int]]:
    """(repeats, multiplicity): the layers whose structure an earlier layer already has, and each
    representative's path (e.g. 'model.layers.3') with how many layers share its structure.

    Layers are grouped by `_structure` of the built module, not by config keys, so dense-then-MoE, sparse steps,
    sliding/global interleaves and per-layer `layer_types` all fall out of what transformers built.
    """
    repeats: list[nn.Module] = []
    multiplicity: dict[str, int] = {}
    for list_name, layers in _layer_lists(model):
        first_of: dict[tuple, str] = {}
        for i, layer in enumerate(layers):
            path = f"{list_name}.{i}"
            rep = first_of.setdefault(_structure(layer), path)
            multiplicity[rep] = multiplicity.get(rep, 0) + 1
            if rep != path:
                repeats.append(layer)
    return repeats, multiplicity


def _weight(name: str, multiplicity: dict[str, int]) -> int:
    """How many real parameters one parameter of the skeleton stands for."""
    return next((n for rep, n in multiplicity.items() if name.startswith(rep + ".")), 1)


def _peft_count(model: nn.Module, config) -> tuple[int, int, int]:
    """(trainable, all, rank-free part of trainable) as peft reports them for `model`, exactly.

    peft runs on a skeleton: a copy of `model` holding one layer per distinct layer structure (the others are
    empty stand-ins, so indices and names are kept), and each adapter tensor counts once per layer it stands for.
    peft wraps every layer on its own, so this equals peft on the full model (tests check it on every shipped
    config and on mixed-layer layouts) at a fraction of the injection time.
    """
    from peft import get_peft_model

    repeats, multiplicity = layer_representatives(model)
    # deepcopy takes memo entries as already copied: each repeat becomes an empty module, its index kept.
    memo = {id(layer): nn.Module() for layer in repeats}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # peft mutates the model it wraps; low_cpu_mem_usage puts the adapter tensors on meta too.
        peft_model = get_peft_model(copy.deepcopy(model, memo), config, low_cpu_mem_usage=True)
        skeleton_trainable, skeleton_all = peft_model.get_nb_trainable_parameters()
    trainable = rank_free = 0
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            n = p.numel() * _weight(name.removeprefix("base_model.model."), multiplicity)
            trainable += n
            rank_free += 0 if _RANK_TENSOR.search(name) else n
    # peft's all = its base count (4-bit aware) + adapters; the stand-ins' base is added back (meta: plain numel).
    left_out = sum(p.numel() for layer in repeats for p in layer.parameters())
    return trainable, skeleton_all - skeleton_trainable + left_out + trainable, rank_free


def trainable_counts(
    model_or_config,
    lora: LoraSpec,
    targets: str | Sequence[str] | None = None,
    ranks: Sequence[int] | None = None,
    *,
    shape: ModelShape | None = None,
) -> list[TrainableCount]:
    """Trainable / all parameter counts exactly as peft reports them (print_trainable_parameters), per rank.

    peft runs for real (get_peft_model on a one-layer-per-structure copy of the meta model) at the first rank. Other ranks
    scale the adapter tensors peft created: every lora_A / lora_B has r (or a fixed multiple of r, e.g.
    peft's 2r on a fused gate_up_proj) as one dimension, and DoRA's magnitude vectors do not depend on r.
    Tests check the scaled counts against peft run at each rank.

    Args:
        model_or_config: a meta (or real) model, or a transformers config to build one from.
        lora: the adapter spec; its r and targets are the defaults for `ranks` and `targets`.
        targets: preset or names (raw or resolve_targets output); defaults to `lora.targets`.
        ranks: ranks to report; defaults to `(lora.r,)`.
        shape: the model's ModelShape if the caller has it (saves re-reading it).

    Raises:
        LoraDoctorError: a rank <= 0, targets that match nothing, DoRA on parameter targets.
    """
    ranks = list(ranks) if ranks is not None else [lora.r]
    for r in ranks:
        LoraSpec(r=r)  # validates r the way the CLI would, before any work
    model = model_or_config if isinstance(model_or_config, nn.Module) else build_meta_model(model_or_config)
    if shape is None:
        config = model.config
        shape = model_shape(model, config, model_id=getattr(config, "_name_or_path", "") or config.model_type,
                            source="given")
    raw = lora.targets if targets is None else targets
    # Dropout never changes a count; zero it so parameter targets (which refuse dropout) can be counted.
    counting = dataclasses.replace(lora, dropout=0.0)

    def measure(r: int) -> tuple[int, int, int]:
        return _peft_count(model, lora_config(shape, dataclasses.replace(counting, r=r), raw))

    r0 = ranks[0]
    trainable0, all0, rank_free = measure(r0)
    per_rank, rem = divmod(trainable0 - rank_free, r0)
    out = []
    for r in ranks:
        if r == r0:
            trainable, all_params = trainable0, all0
        elif rem == 0:
            trainable = rank_free + per_rank * r
            all_params = all0 - trainable0 + trainable
        else:  # some tensor is not a multiple of r (a fixed rank_pattern): ask peft again
            trainable, all_params, _ = measure(r)
        out.append(TrainableCount(r=r, trainable=trainable, all_params=all_params))
    return out
