"""Which modules LoRA wraps: peft's matching rule, per-architecture presets, and how requests map onto a model.

One rule decides whether a target names a module (or, for fused expert tensors, a parameter): peft's own
`peft.tuners.tuners_utils.check_target_module_exists` with a list of names, i.e. the full name equals the target
or ends with '.' + target. peft applies the same test to `target_parameters` keys (BaseTuner._inject_parameters),
so one function serves both. budget.py (what it costs), introspect.py (the LoraConfig) and checks/ (what the
user meant) all ask `matches`; nothing here re-derives it.

peft imports torch, which a cached `plan` must not pay for: `MatchedTargets` carries the match result, so the
plan cache can rebuild it from stored counts and the budget never asks peft again.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import LoraDoctorError
from .shape import LeafGroup, ModelShape, ParamGroup

PRESETS: dict[str, str] = {
    "qv": "query and value projections (the LoRA paper's choice); on fused qkv layers this is the whole qkv",
    "attn": "every attention projection (q, k, v, o or their fused forms)",
    "mlp": "every MLP / feed-forward projection (fused MoE expert tensors included)",
    "all-linear": "peft's 'all-linear': every Linear/Conv1D except the output layer",
}

ROLE_OF_NAME = {
    **dict.fromkeys(("q_proj", "q", "query", "wq", "q_lin"), "q"),
    **dict.fromkeys(("k_proj", "k", "key", "wk", "k_lin"), "k"),
    **dict.fromkeys(("v_proj", "v", "value", "wv", "v_lin"), "v"),
    **dict.fromkeys(("o_proj", "out_proj", "wo", "out_lin"), "o"),
    **dict.fromkeys(("gate_proj", "w1"), "gate"),
    **dict.fromkeys(("up_proj", "w3"), "up"),
    **dict.fromkeys(("down_proj", "w2"), "down"),
}
"""Leaf names by the projection they compute, for 'qv' and for explaining fused layers."""

FUSED = {
    "qkv_proj": ("q", "k", "v"),            # Phi-3
    "c_attn": ("q", "k", "v"),              # GPT-2
    "query_key_value": ("q", "k", "v"),     # Falcon, GPT-NeoX
    "Wqkv": ("q", "k", "v"),                # MPT, Phi-1/2 (remote code)
    "W_pack": ("q", "k", "v"),              # Baichuan
    "qkv": ("q", "k", "v"),
    "gate_up_proj": ("gate", "up"),         # Phi-3; also Mixtral's fused expert tensor
}
"""Leaves that compute several projections in one matmul -> the projections."""

ATTN_MARKERS = ("attn", "attention")
"""A module path with a parent containing one of these is attention (self_attn, attention, c_attn's attn)."""

Group = LeafGroup | ParamGroup


# -- the rule --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TargetList:
    """The fields of a LoraConfig that check_target_module_exists reads, for a plain list of names."""

    target_modules: tuple[str, ...]
    target_parameters: None = None
    exclude_modules: None = None
    modules_to_save: None = None
    layers_to_transform: None = None
    layers_pattern: None = None


def matches(key: str, targets: Sequence[str]) -> bool:
    """True if peft would wrap the module (or parameter) named `key` for this list of target names."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(_TargetList(tuple(targets)), key))


def _keys(g: Group) -> tuple[str, ...]:
    # A hand-built shape has no paths: its group name is the one key (every real path ends in it).
    return g.paths or (g.name,)


def searchable(shape: ModelShape) -> tuple[Group, ...]:
    """Everything LoRA can wrap: Linear/Conv1D leaves, embeddings (peft lora.Embedding), fused expert tensors."""
    return (*shape.leaves, *shape.embeddings, *shape.param_groups)


def group_matches(g: Group, targets: Sequence[str]) -> bool:
    """True if any module of the group matches one of the targets."""
    return any(matches(k, targets) for k in _keys(g))


def wrapped_count(g: Group, targets: Sequence[str]) -> int:
    """How many of the group's modules peft wraps for these targets."""
    if not g.paths:
        return g.count if matches(g.name, targets) else 0
    return sum(1 for p in g.paths if matches(p, targets))


class MatchedTargets(tuple):
    """Resolved target names (a tuple of str) that also carry (group, modules wrapped) for one ModelShape.

    Built by `match_targets` (asks peft) or `from_counts` (the plan cache, without importing peft).
    """

    groups: tuple[tuple[Group, int], ...]

    def __new__(cls, names: Sequence[str], groups: Sequence[tuple[Group, int]]):
        self = super().__new__(cls, names)
        self.groups = tuple(groups)
        return self

    def counts(self, shape: ModelShape) -> list[int]:
        """Modules wrapped per `searchable(shape)` group, in that order (what the plan cache stores)."""
        n_of = {id(g): n for g, n in self.groups}
        return [n_of.get(id(g), 0) for g in searchable(shape)]

    @classmethod
    def from_counts(cls, shape: ModelShape, names: Sequence[str], counts: Sequence[int]) -> MatchedTargets:
        return cls(names, [(g, n) for g, n in zip(searchable(shape), counts, strict=True) if n])


def match_targets(shape: ModelShape, targets: Sequence[str]) -> MatchedTargets:
    """Resolved target names (introspect.resolve_targets) with the groups they wrap; a MatchedTargets is kept."""
    if isinstance(targets, MatchedTargets):
        return targets
    names = tuple(targets)
    if not names:  # full fine-tuning columns pass no targets; skip importing peft for an empty match
        return MatchedTargets((), ())
    groups = [(g, n) for g in searchable(shape) if (n := wrapped_count(g, names))]
    return MatchedTargets(names, groups)


def targeted_groups(shape: ModelShape, targets: Sequence[str]) -> list[tuple[Group, int]]:
    """(group, number of its modules LoRA wraps) for resolved target names, by peft's rule.

    Leaves, embeddings (peft lora.Embedding) and fused expert tensors (peft target_parameters) all count.
    """
    return list(match_targets(shape, targets).groups)


def target_groups(shape: ModelShape, names: Sequence[str]) -> tuple[Group, ...]:
    """The leaf/embedding/expert groups that resolved target names touch (a group counts if any path matches)."""
    return tuple(g for g, _ in targeted_groups(shape, names))


def layer_width(g: Group) -> int:
    """The wider side of one module of the group: max(in_features, out_features)."""
    return max(g.in_features, g.out_features)


def require_rank_fits(shape: ModelShape, targets: Sequence[str], ranks: Sequence[int], *,
                      run_config: bool = False) -> None:
    """Refuse a LoRA rank wider than every targeted layer, before anything is built at that rank.

    B @ A is (out, r) @ (r, in): its rank is at most min(in, out), so an r past even the wider side
    (max(in, out)) of the widest targeted layer only allocates adapter rows that can never matter; it is
    a typo (an extra zero) far more often than a choice. An r between a layer's sides is plan's
    'rank-exceeds-dim' note, not an error. peft's rank_pattern doubling on fused expert tensors is not
    counted: the rule compares the r the user typed. `run_config`: the hint also names the file key.

    Raises:
        LoraDoctorError: naming the largest offending r, the widest targeted layer and its width, and the fix.
    """
    groups = [g for g, _ in targeted_groups(shape, targets)]
    if not groups or not ranks:
        return
    widest = max(groups, key=layer_width)
    r = max(ranks)
    if r <= layer_width(widest):
        return
    # Only layers 'all-linear' would adapt: an embedding or lm_head is wide (the vocabulary) but no fix.
    candidates = [*(g for g in shape.leaves if g.default_target), *shape.param_groups]
    wider = [g.name for g in candidates if layer_width(g) >= r and g not in groups]
    other = f", or target layers that wide: --target {','.join(dict.fromkeys(wider))}" if wider else ""
    suggest = min(64, max(min(g.in_features, g.out_features) for g in groups))
    raise LoraDoctorError(
        f"r={r} is larger than the widest targeted layer, {widest.name} ({widest.in_features:,} -> "
        f"{widest.out_features:,}, width {layer_width(widest):,}): the update B@A cannot use that rank.",
        f"Try: --r {suggest}{f' (lora.r: {suggest} in a run config)' if run_config else ''}{other}")


# -- presets ---------------------------------------------------------------------------------------------------


def _is_attention(path: str) -> bool:
    parents = path.split(".")[:-1]
    return any(m in part.lower() for part in parents for m in ATTN_MARKERS)


def _role_names(shape: ModelShape, paths_by_name: dict[str, list[str]], role_paths: set[str]) -> list[str]:
    """Leaf names covering exactly `role_paths`, in model order; a name shared with another role (GPT-2's
    attn.c_proj / mlp.c_proj) is qualified by its parent module."""
    group_index = {p: i for i, g in enumerate(shape.leaves) for p in g.paths}
    named: dict[str, int] = {}  # name -> index of the first leaf group it covers
    for name, paths in paths_by_name.items():
        mine = [p for p in paths if p in role_paths]
        if not mine:
            continue
        if len(mine) == len(paths):
            named[name] = min(group_index[p] for p in mine)
        else:
            for p in mine:
                qualified = f"{p.split('.')[-2]}.{name}"
                named[qualified] = min(named.get(qualified, group_index[p]), group_index[p])
    return sorted(named, key=named.__getitem__)


def preset_targets(shape: ModelShape) -> dict[str, tuple[str, ...]]:
    """Every preset resolved for this architecture (an empty tuple where it matches nothing)."""
    paths_by_name: dict[str, list[str]] = {}
    for g in shape.leaves:
        if g.default_target:
            paths_by_name.setdefault(g.name, []).extend(g.paths)
    all_paths = {p for ps in paths_by_name.values() for p in ps}
    attn_paths = {p for p in all_paths if _is_attention(p)}
    mlp_paths = all_paths - attn_paths
    qv_paths = {p for p in attn_paths
                if ROLE_OF_NAME.get(p.rsplit(".", 1)[-1]) in ("q", "v") or p.rsplit(".", 1)[-1] in FUSED}
    return {
        "qv": tuple(_role_names(shape, paths_by_name, qv_paths)),
        "attn": tuple(_role_names(shape, paths_by_name, attn_paths)),
        "mlp": tuple(_role_names(shape, paths_by_name, mlp_paths))
        + tuple(g.name for g in shape.param_groups if g.num_experts > 1),
        "all-linear": tuple(paths_by_name) + tuple(g.name for g in shape.param_groups if g.all_linear),
    }


def split_targets(targets: str | Sequence[str]) -> list[str]:
    """'q_proj, v_proj' or ['q_proj', 'v_proj'] -> ['q_proj', 'v_proj'] (blanks dropped)."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    return [t.strip() for t in items if t and t.strip()]


# -- resolving what the user typed -----------------------------------------------------------------------------


def _suggest_preset(name: str) -> str:
    role = ROLE_OF_NAME.get(name) or ("q" if name in FUSED and "q" in FUSED[name] else None)
    if role in ("q", "k", "v", "o") or any(m in name.lower() for m in ATTN_MARKERS):
        return "attn"
    if role in ("gate", "up", "down") or any(m in name.lower() for m in ("mlp", "fc", "ffn", "dense_")):
        return "mlp"
    return "all-linear"


def _no_match_error(shape: ModelShape, name: str) -> LoraDoctorError:
    leaves = ", ".join(dict.fromkeys(g.name for g in shape.leaves if g.default_target))
    if shape.param_groups:
        leaves += "; parameter targets: " + ", ".join(g.name for g in shape.param_groups)
    if "-" in name or difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.6):
        return LoraDoctorError(
            f"Unknown preset {name!r}.",
            f"Presets: {', '.join(PRESETS)}. Targetable leaves: {leaves}. Try: --target all-linear "
            "(lora.targets: all-linear in a run config)",
        )
    return LoraDoctorError(
        f"No module in {shape.model_id!r} matches target {name!r}.",
        f"Targetable leaves: {leaves}. Try: lora-doctor plan {shape.model_id} --target {_suggest_preset(name)}",
    )


def _preset_names(shape: ModelShape, presets: dict[str, tuple[str, ...]], item: str) -> tuple[str, ...]:
    if not presets[item]:
        available = [p for p, names in presets.items() if names]
        raise LoraDoctorError(
            f"Preset {item!r} matches no module in {shape.model_id!r} ({shape.architecture}).",
            f"Presets that match here: {', '.join(available)}. Try: lora-doctor modules {shape.model_id}",
        )
    return presets[item]


def resolve_targets(shape: ModelShape, targets: str | Sequence[str]) -> tuple[str, ...]:
    """Presets and explicit names (comma-separated or a list) -> target names peft will match.

    Explicit names follow peft's rule (`matches`). Embeddings are accepted (peft has lora.Embedding).

    Raises:
        LoraDoctorError: an empty target list, a preset that matches nothing here, or a name that matches nothing.
    """
    items = split_targets(targets)
    if not items:
        raise LoraDoctorError("No target modules given.", f"Presets: {', '.join(PRESETS)}. Try: --target all-linear")
    presets = None
    out: list[str] = []
    for item in items:
        if item in PRESETS:
            presets = presets or preset_targets(shape)
            out.extend(_preset_names(shape, presets, item))
        elif any(group_matches(g, [item]) for g in searchable(shape)):
            out.append(item)
        else:
            raise _no_match_error(shape, item)
    return tuple(dict.fromkeys(out))


# -- coverage: what the user asked for against what this model has ---------------------------------------------


@dataclass(frozen=True)
class FusedTarget:
    """A fused layer standing in for projections the user named separately."""

    leaf: str
    """The fused leaf, e.g. 'qkv_proj'."""
    requested: tuple[str, ...]
    """The user's names it stands in for, e.g. ('q_proj', 'v_proj') or ('qv',)."""
    projections: tuple[str, ...]
    """What the fused layer computes, e.g. ('q', 'k', 'v')."""
    also_adapts: tuple[str, ...]
    """Projections LoRA on the fused layer adapts that the user did not ask for, e.g. ('k',)."""


@dataclass(frozen=True)
class Coverage:
    """How requested targets map onto this model; for the doctor's 'covers only part of what you asked' check."""

    matched: tuple[str, ...]
    """Requested items (names or presets) that match something as given."""
    unmatched: tuple[str, ...]
    """Requested names that match nothing (peft would raise or, in a list with others, skip them)."""
    fused: tuple[FusedTarget, ...]

    @property
    def exact(self) -> bool:
        return not self.unmatched and not self.fused


def _fused_targets(groups: Sequence[Group], wanted_roles: dict[str, list[str]]) -> list[FusedTarget]:
    fused = []
    for leaf in dict.fromkeys(g.name for g in groups):
        projections = FUSED.get(leaf.rsplit(".", 1)[-1])
        asked = [r for r in projections or () if r in wanted_roles]
        if not asked:
            continue
        requested_items = tuple(dict.fromkeys(i for r in asked for i in wanted_roles[r]))
        fused.append(FusedTarget(leaf=leaf, requested=requested_items, projections=projections,
                                 also_adapts=tuple(r for r in projections if r not in wanted_roles)))
    return fused


def partial_coverage(shape: ModelShape, requested: str | Sequence[str]) -> Coverage:
    """Compare what the user asked for (names/presets) with what this architecture has; never raises.

    E.g. `q_proj,v_proj` or `qv` on Phi-3 -> unmatched/fused `qkv_proj` that also adapts k.
    """
    groups = searchable(shape)
    present_leaf_names = {g.name.rsplit(".", 1)[-1] for g in groups}
    matched, unmatched = [], []
    wanted_roles: dict[str, list[str]] = {}  # role -> requested items asking for it
    for item in split_targets(requested):
        if item in PRESETS:
            matched.append(item)
            if item == "qv":
                wanted_roles.setdefault("q", []).append(item)
                wanted_roles.setdefault("v", []).append(item)
            continue
        (matched if any(group_matches(g, [item]) for g in groups) else unmatched).append(item)
        role = ROLE_OF_NAME.get(item.rsplit(".", 1)[-1])
        if role and item.rsplit(".", 1)[-1] not in present_leaf_names:
            wanted_roles.setdefault(role, []).append(item)
    return Coverage(matched=tuple(matched), unmatched=tuple(unmatched),
                    fused=tuple(_fused_targets(groups, wanted_roles)))
