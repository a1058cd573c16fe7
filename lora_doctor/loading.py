"""Loading: the model's config resolved once, the tokenizer, then the base (nf4/fp4 or 16-bit) wrapped with peft.

Flow: `resolve_source(cfg)` (config.json only, offline-first: seconds, before any weights) ->
`load_tokenizer(cfg, source)` -> `load_peft_model(cfg, device, source=source)`. The resolved config is
read once and carried in `ModelSource`; the meta-device `ModelShape` that plan uses for the LoRA targets
is built from that same config, once, on first use.
"""

from __future__ import annotations

import contextlib
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import LoraDoctorError
from .measure import ModelInfo
from .runconfig import RunConfig

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def require_bitsandbytes(why: str) -> None:
    """Import bitsandbytes or raise a one-line error saying what needed it and what to do instead."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # ImportError, or a RuntimeError/OSError from its native library
        raise LoraDoctorError(
            f"bitsandbytes is needed for {why} but could not be imported ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).",
            "pip install bitsandbytes; or run without it: --quant none --optim adamw") from None


def resolve_device(requested: str) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise LoraDoctorError("--device cuda was requested but torch sees no CUDA device.",
                              "Use --device cpu (slow, fine for tiny models) or check the driver with nvidia-smi.")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def preload_libraries(cfg: RunConfig) -> None:
    """Import peft, transformers' model classes and (when the run needs it) bitsandbytes now, so a memory
    baseline taken next measures the run, not the imports."""
    import peft  # noqa: F401
    import transformers.models.auto.modeling_auto  # noqa: F401

    if cfg.quant.mode is not None or "8bit" in cfg.train.optim:
        with contextlib.suppress(Exception):  # a broken bitsandbytes is reported by require_bitsandbytes
            import bitsandbytes  # noqa: F401


def is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def attention_implementation(config, requested: str, note=None) -> str:
    """`requested`, unless the architecture cannot run it: Gemma-2 sets _supports_sdpa = False, and
    transformers 5 then refuses sdpa outright instead of falling back (budget.py costs eager there too)."""
    if requested != "sdpa" or config is None:
        return requested
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:  # remote code or an unusual config: let from_pretrained decide
        return requested
    if getattr(model_class, "_supports_sdpa", True):
        return requested
    if note is not None:
        note(f"note: {model_class.__name__} has no sdpa attention in transformers; using eager.")
    return "eager"


@contextlib.contextmanager
def quiet_transformers():
    """No loading/writing progress bars, info logs or deprecation notices from transformers/peft internals;
    progress is ours to print, on stderr."""
    from transformers import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def pretrained_path(model: str) -> str:
    """The path every from_pretrained here uses: a local folder as an absolute path, so the adapter's
    base_model_name_or_path works from any working folder; a hub id stays an id."""
    local = Path(model).expanduser()
    return str(local.resolve()) if local.is_dir() else model


def _model_error(model: str, e: Exception) -> LoraDoctorError:
    # The whole message on one line: transformers' tokenizer error puts its reasons on the lines after the first.
    first = " ".join(str(e).split())[:400] or type(e).__name__
    if Path(model).exists():
        have = sorted(p.name for p in Path(model).iterdir())[:12] if Path(model).is_dir() else []
        return LoraDoctorError(f"Cannot load model {model!r}: {first}",
                               f"The folder holds: {', '.join(have) or 'nothing'}; it needs config.json, weights and "
                               "tokenizer files (save_pretrained writes them). python examples/make_tiny_model.py "
                               "writes a tiny one.")
    return LoraDoctorError(f"Cannot load model {model!r}: {first}",
                           "Give a local folder (save_pretrained output) or a hub id already in the HF cache; "
                           "python examples/make_tiny_model.py writes a tiny one offline.")


# --- the model's config, resolved once ------------------------------------------------------------


@dataclass
class ModelSource:
    """Where the weights load from and the config they were saved with; resolved once per run."""

    model: str
    """What the user typed (a hub id or a folder)."""
    path: str
    """What from_pretrained gets: pretrained_path(model)."""
    config: object
    """The transformers config as saved (its dtype is the checkpoint's, which the doctor compares with --precision)."""
    source: str
    """resolve.py's ResolvedConfig.source ('local directory', 'HF cache', ...)."""
    trust_remote_code: bool = False
    _shape: object = field(default=None, repr=False)
    _module_names: tuple[str, ...] = field(default=(), repr=False)

    @property
    def shape(self):
        """introspect's ModelShape of this config, built on the meta device on first use (plan uses the same)."""
        if self._shape is None:
            from .introspect import build_meta_model, model_shape

            meta = build_meta_model(self.config, trust_remote_code=self.trust_remote_code)
            self._shape = model_shape(meta, self.config, model_id=self.model, source=self.source)
            self._module_names = tuple(n for n, _ in meta.named_modules())
        return self._shape

    @property
    def module_names(self) -> tuple[str, ...]:
        """Every module path of the meta model: the loaded model's, before quantization swaps Linear for Linear4bit."""
        _ = self.shape  # builds the meta model, and with it the names, once
        return self._module_names


def resolve_source(cfg: RunConfig, *, hooked: bool = False) -> ModelSource:
    """resolve.py's offline-first lookup, with its clear messages (unknown id, a folder without config.json,
    offline mode), refusing a hub id known only by a shipped config: probe and train need weights.

    The targets and the rank are refused here too, on the meta model, so a 70B run stops in seconds instead of
    after its load; `hooked` (a model hook will add modules) leaves the targets to the loaded model."""
    from .resolve import hub_offline, resolve_model_config

    resolved = resolve_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if resolved.source == "shipped config" and hub_offline():
        raise LoraDoctorError(
            f"Model {cfg.model!r} is known here only by its shipped config: its weights and tokenizer are not "
            "in the HF cache, and the hub is not asked (offline mode).",
            f"Download it first (huggingface-cli download {cfg.model}) or pass "
            "--model a local folder; lora-doctor plan/check work from the config alone.")
    source = ModelSource(model=cfg.model, path=pretrained_path(cfg.model), config=resolved.config,
                         source=resolved.source, trust_remote_code=cfg.trust_remote_code)
    if not hooked:
        _lora_config_or_names(cfg, source, source.module_names)  # what peft_lora_config refuses after the load
    _refuse_oversized_rank(cfg, source)
    return source


def _refuse_oversized_rank(cfg: RunConfig, source: ModelSource) -> None:
    """targets.require_rank_fits on the meta shape, before the tokenizer, the data or any weight loads."""
    from .targets import require_rank_fits, resolve_targets

    try:
        names = resolve_targets(source.shape, cfg.lora.targets)
    except LoraDoctorError:
        return  # names only the live model has (a hook's modules): peft_lora_config decides
    require_rank_fits(source.shape, names, [cfg.lora.r], run_config=True)


def _lora_config_or_names(cfg: RunConfig, source: ModelSource, module_names):
    """introspect.lora_config on the meta shape, or None when it refuses names that every one exist among
    `module_names` (modules the shape's leaves do not list: peft gets them as they are).

    The one rule behind both refusals: before the load with the meta model's module names (resolve_source), after
    it with the live model's (peft_lora_config), so the early refusal is exactly the late one.

    Raises:
        LoraDoctorError: a target matching no module (target-not-found / partial-target-coverage), an unknown
            preset, or DoRA / dropout on parameter targets.
    """
    from .introspect import lora_config
    from .targets import matches, split_targets

    try:
        return lora_config(source.shape, cfg.lora)
    except LoraDoctorError:
        # targets.matches is peft's own rule; one name at a time, because every name must exist in the model.
        if not all(any(matches(p, [t]) for p in module_names) for t in split_targets(cfg.lora.targets)):
            raise
    return None


def load_tokenizer(cfg: RunConfig, source: ModelSource):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise _model_error(cfg.model, e) from None
    tokenizer.padding_side = cfg.data.padding_side
    return tokenizer


# --- the peft model -------------------------------------------------------------------------------


def load_peft_model(cfg: RunConfig, device: str, *, source: ModelSource | None = None, device_index: int | None = None,
                    world_size: int = 1, model_hook: Callable | None = None,
                    note: Callable[[str], None] | None = None, fsdp: bool = False,
                    base_loader: Callable | None = None) -> tuple[object, ModelInfo]:
    """Load the base on `device`, prepare it for training, wrap it with LoRA; returns (peft model, ModelInfo).

    Args:
        source: the resolved config (resolve_source); resolved here when None.
        device_index: the CUDA device of this process (DDP rank); None on CPU.
        world_size: recorded in ModelInfo; DDP wrapping is the caller's.
        model_hook: applied to the loaded base before LoRA (tests plant faults with it).
        note: where one-line notes go (e.g. eager attention instead of sdpa).
        fsdp: the model will be FSDP-sharded: 4-bit weights are stored in the compute dtype (fsdp.py).
        base_loader: builds the base instead of from_pretrained (bench/gpu_check.py: random weights quantized in
            place), called with keywords (cfg, source, device, device_index, note, fsdp) and returning the model
            in compute_dtype(cfg); preparation and LoRA follow as for a loaded one.

    Raises:
        LoraDoctorError: the weights cannot load, bitsandbytes is missing, or the targets adapt nothing.
        torch.OutOfMemoryError: as raised, for the caller to report with its measured peak.
    """
    source = source if source is not None else resolve_source(cfg)
    if base_loader is None:
        model, dtype = _load_base(cfg, source, device, device_index, note, fsdp)
    else:
        model = base_loader(cfg=cfg, source=source, device=device, device_index=device_index, note=note, fsdp=fsdp)
        dtype = compute_dtype(cfg)
    if model_hook is not None:
        model = model_hook(model) or model
    model = _prepare_for_training(model, cfg)
    model = _wrap_lora(model, cfg, source)
    return model, _model_info(model, cfg, device, dtype, world_size)


def _load_base(cfg: RunConfig, source: ModelSource, device: str, device_index: int | None, note,
               fsdp: bool = False) -> tuple[object, object]:
    import torch
    from transformers import AutoModelForCausalLM

    q = cfg.quant
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    kwargs = dict(trust_remote_code=cfg.trust_remote_code,
                  attn_implementation=attention_implementation(source.config, cfg.train.attn_impl, note))
    if q.mode is not None:
        require_bitsandbytes(f"{q.mode} quantization (QLoRA)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.mode, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
            # FSDP shards float parameters only: the packed 4-bit bytes stored as compute-dtype elements
            # shard like any weight (fsdp_qlora; accelerate's fsdp2_prepare_model). uint8 otherwise.
            bnb_4bit_quant_storage=torch_dtype(q.compute_dtype) if fsdp else torch.uint8)
        # QLoRA loads the non-quantized parts in the compute dtype; they stay there unless
        # quant.upcast_frozen asks for peft's fp32 copies (prepare.py says why neither is needed).
    kwargs["dtype"] = compute_dtype(cfg)
    device_map = {"": device_index if device == "cuda" else "cpu"}
    with quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, device_map=device_map, **kwargs)
        except Exception as e:
            if is_oom(e):
                raise
            raise _model_error(cfg.model, e) from None
    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    return model, kwargs["dtype"]


def _prepare_for_training(model, cfg: RunConfig):
    """Freeze the base and enable checkpointing; QLoRA's frozen weights stay 16-bit unless quant.upcast_frozen (prepare.py)."""
    from .prepare import prepare_for_training

    return prepare_for_training(model, cfg.quant.mode, cfg.quant.upcast_frozen, cfg.train.grad_ckpt)


def compute_dtype(cfg: RunConfig):
    """The dtype frozen 16-bit weights load in (and FSDP all-gathers in).

    The step's 16-bit autocast dtype (train.precision) when there is one, so every op sees one 16-bit type:
    fp16 weights under bf16 autocast fail in CPU kernels (at::autocast::prioritize) now that nothing is upcast
    to fp32. Otherwise quant.compute_dtype under QLoRA, else train.precision.
    """
    p = cfg.train.precision
    if cfg.quant.mode is not None and p == "fp32":
        return torch_dtype(cfg.quant.compute_dtype)
    return torch_dtype(p)


def _wrap_lora(model, cfg: RunConfig, source: ModelSource):
    import torch
    from peft import get_peft_model

    from .prepare import cast_trainable

    torch.manual_seed(cfg.train.seed)  # adapter init (lora_A kaiming; lora_B zeros)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so; nothing for users to act on.
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            model = get_peft_model(model, peft_lora_config(cfg, source, model),
                                   autocast_adapter_dtype=cfg.lora.adapter_dtype == "fp32")
    except ValueError as e:
        raise LoraDoctorError(f"peft could not apply LoRA to {cfg.model!r}: {str(e).splitlines()[0]}",
                              f"List the targetable leaves: lora-doctor modules {cfg.model}") from None
    cast_trainable(model, cfg.lora.adapter_dtype, compute_dtype(cfg))
    if model.get_nb_trainable_parameters()[0] == 0:
        raise LoraDoctorError(f"LoRA targets {cfg.lora.targets!r} made 0 parameters trainable in {cfg.model!r}.",
                              f"List the targetable leaves: lora-doctor modules {cfg.model}")
    model.train()
    return model


def peft_lora_config(cfg: RunConfig, source: ModelSource, model):
    """peft LoraConfig: presets resolved per architecture by introspect.lora_config (plan uses the same);
    explicit names that only the live model has (e.g. modules added by a hook) go to peft as they are."""
    from peft import LoraConfig

    from .introspect import saved_kwargs
    from .targets import split_targets

    lora = cfg.lora
    names = split_targets(lora.targets)
    config = _lora_config_or_names(cfg, source, [n for n, _ in model.named_modules()])
    if config is not None:
        return config
    return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                      use_rslora=lora.use_rslora, target_modules=names, task_type="CAUSAL_LM", **saved_kwargs(lora))


def _model_info(model, cfg: RunConfig, device: str, dtype, world_size: int) -> ModelInfo:
    trainable, total = model.get_nb_trainable_parameters()
    adapted = [n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n]
    # Leaf names in model order (q, k, v, o, gate, up, down), as plan and check list them.
    leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in adapted))
    return ModelInfo(
        model=cfg.model, model_type=getattr(model.config, "model_type", "?"), device=device, quant=cfg.quant.mode,
        base_dtype=str(dtype).removeprefix("torch."), trainable_params=int(trainable), all_params=int(total),
        target_modules=tuple(leaves), n_adapted_modules=len(set(adapted)), world_size=world_size)



def eval_mode(model, device: str, quant_mode: str | None) -> None:
    """model.eval(), except bitsandbytes 4-bit layers on CPU stay in train mode.

    bitsandbytes' Linear4bit.forward on CPU, in eval mode under no_grad, repacks its weight in place
    into a CPU-only layout (`_convert_weight_packed_for_cpu`); training afterwards runs through that
    layout (its gemv has no autograd kernel) and the loss drifts from an un-evaluated run. Linear4bit
    has no dropout, so train mode changes nothing else for it.
    """
    model.eval()
    if device != "cpu" or quant_mode is None:
        return
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.training = True

__all__ = ["ModelSource", "TORCH_DTYPES", "attention_implementation", "compute_dtype", "eval_mode", "is_oom",
           "load_peft_model", "load_tokenizer", "preload_libraries", "pretrained_path", "quiet_transformers",
           "require_bitsandbytes", "resolve_device", "resolve_source", "torch_dtype"]
