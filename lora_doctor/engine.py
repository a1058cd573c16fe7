"""The one engine behind `probe` and `train`: load (nf4/fp4 or 16-bit), prepare, wrap with peft, run.

A readable recipe in torchtune's style: `setup()` calls `_setup_model`, `_setup_data`,
`_setup_optimizer`; `run_steps(n, callbacks)` runs optimizer steps; `_loss_step` is one micro-batch;
`save_checkpoint` / `load_checkpoint` make a run resumable bit-for-bit on the same machine. `probe`
and `train` differ only in how many steps they run and which callbacks they pass.

Determinism: the adapter init, LoRA dropout and data order all derive from `train.seed`. The data
order of epoch e is a permutation seeded by (seed, e), so the data position is just a counter; a
checkpoint stores that counter, the RNG states, the optimizer and the scheduler.

Distributed: under `accelerate launch` (or torchrun) each process loads the model on its own device,
the model is wrapped in DistributedDataParallel, each rank takes its slice of every global
micro-batch, and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

from .data import IGNORE_INDEX, DataStats, TokenizedData, collate, epoch_order, load_data
from .errors import LoraDoctorError
from .fileio import write_json_atomic, write_text_atomic
from .measure import (GradFlowRecorder, MemoryMonitor, MemoryStats, ModelInfo, RunResult, StepRecord, loss_stats,
                      throughput)
from .runconfig import RunConfig

TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
CHECKPOINT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "adapter_weights.safetensors"

StepCallback = Callable[["Engine", StepRecord], None]


class OutOfMemory(LoraDoctorError):
    """The run did not fit: raised with the peak memory seen and what to change."""


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


class Engine:
    """Load once, then run optimizer steps. Build with a RunConfig, call `setup()`, then `run_steps()`.

    Args:
        cfg: the validated run config.
        model_hook: applied to the loaded base model before LoRA; tests use it to plant faults
            (e.g. a module that never feeds the loss).
    """

    def __init__(self, cfg: RunConfig, *, model_hook: Callable | None = None):
        self.cfg = cfg
        self.model_hook = model_hook
        self.model = None
        self.tokenizer = None
        self.data: TokenizedData | None = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None
        self.step = 0
        """Optimizer steps done."""
        self.micro = 0
        """Micro-batches consumed (per rank): the data position."""
        self.history: list[StepRecord] = []
        self.eval_history: list[tuple[int, float]] = []
        self.memory: dict[str, MemoryStats] = {}
        self.grad_flow: GradFlowRecorder | None = None
        self._t_start = time.perf_counter()
        self._setup_distributed()
        self.monitor = MemoryMonitor(self.device)

    # --- setup ---------------------------------------------------------------------------------

    def _setup_distributed(self) -> None:
        import torch

        world = int(os.environ.get("WORLD_SIZE", "1"))
        self.world_size, self.rank, self.local_rank = world, 0, 0
        device = resolve_device(self.cfg.train.device)
        if world > 1:
            # accelerate launch / torchrun set these; PartialState initialises the process group.
            from accelerate import PartialState

            state = PartialState(cpu=device == "cpu")
            self.rank, self.local_rank, self.world_size = state.process_index, state.local_process_index, state.num_processes
            if device == "cuda":
                torch.cuda.set_device(self.local_rank)
        self.device = device
        self.device_index = self.local_rank if device == "cuda" else None
        self.is_main = self.rank == 0

    def setup(self, log: Callable[[str], None] | None = None) -> Engine:
        """Resolve the model, load the tokenizer and the data, then the model (measuring the load phase),
        the optimizer and the scheduler.

        Everything that can be wrong with the input (model id, config.json, dataset, max_length) is
        checked before the weights load: on a 70B that load is minutes and a GPU allocation.
        """
        self._note = log
        self._resolve_model()
        self._setup_tokenizer()
        self._setup_data()
        # Import the heavy libraries before the baseline, so CPU RSS measures the run, not the imports.
        import peft  # noqa: F401
        import transformers.models.auto.modeling_auto  # noqa: F401

        if self.cfg.quant.mode is not None or "8bit" in self.cfg.train.optim:
            with contextlib.suppress(Exception):
                import bitsandbytes  # noqa: F401
        if log is not None:
            log(f"loading {self.cfg.model} ({self.cfg.quant.mode or 'no quantization'}, {self.device}) ...")
        self.monitor.start("load")
        try:
            self._setup_model()
        except Exception as e:
            if _is_oom(e):
                peak = self.monitor.current_peak()
                self.monitor.stop()
                raise OutOfMemory(f"Out of memory while loading {self.cfg.model!r} (peak {_fmt(peak)}).",
                                  "Use --quant nf4, a smaller model, or a GPU with more memory.") from None
            self.monitor.stop()
            raise
        self.memory["load"] = self.monitor.stop()
        self._setup_optimizer()
        return self

    def _resolve_model(self) -> None:
        """resolve.py's offline-first lookup (clear messages for an unknown id, a folder without config.json,
        offline mode), and the path every from_pretrained here uses: a local folder as an absolute path, so
        the adapter's base_model_name_or_path works from any working folder; a hub id stays an id."""
        from transformers import AutoConfig

        from .resolve import hub_offline, resolve_model_config

        cfg = self.cfg
        resolved = resolve_model_config(cfg.model, trust_remote_code=cfg.trust_remote_code)
        if resolved.source == "shipped config" and hub_offline():
            raise LoraDoctorError(
                f"Model {cfg.model!r} is known here only by its shipped config: its weights and tokenizer are not "
                "in the HF cache, and the hub is not asked (offline mode).",
                f"Download it first (huggingface-cli download {cfg.model}) or pass "
                "--model a local folder; lora-doctor plan/check work from the config alone.")
        local = Path(cfg.model).expanduser()
        self.model_path = str(local.resolve()) if local.is_dir() else cfg.model
        try:
            # The config as saved (its dtype is the checkpoint's, which the doctor compares with --precision).
            self.base_config = AutoConfig.from_pretrained(self.model_path, trust_remote_code=cfg.trust_remote_code)
        except Exception as e:
            raise _model_error(cfg.model, e) from None

    def _setup_tokenizer(self) -> None:
        from transformers import AutoTokenizer

        cfg = self.cfg
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, trust_remote_code=cfg.trust_remote_code)
        except Exception as e:
            raise _model_error(cfg.model, e) from None
        self.tokenizer.padding_side = cfg.data.padding_side

    def _setup_model(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        cfg, q = self.cfg, self.cfg.quant
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)

        kwargs = dict(trust_remote_code=cfg.trust_remote_code,
                      attn_implementation=attention_implementation(self.base_config, cfg.train.attn_impl,
                                                                   getattr(self, "_note", None)))
        device_map = {"": self.device_index if self.device == "cuda" else "cpu"}
        if q.mode is not None:
            require_bitsandbytes(f"{q.mode} quantization (QLoRA)")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=q.mode, bnb_4bit_use_double_quant=q.double_quant,
                bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype))
            # QLoRA loads the non-quantized parts in the compute dtype; prepare_model_for_kbit_training
            # then upcasts them to fp32 (memory budget.py counts).
            kwargs["dtype"] = torch_dtype(q.compute_dtype)
        else:
            kwargs["dtype"] = torch_dtype(cfg.train.precision)
        with quiet_transformers():
            try:
                model = AutoModelForCausalLM.from_pretrained(self.model_path, device_map=device_map, **kwargs)
            except Exception as e:
                if _is_oom(e):
                    raise
                raise _model_error(cfg.model, e) from None
        model.config.use_cache = False  # the KV cache is useless in training and costs memory
        if self.model_hook is not None:
            model = self.model_hook(model) or model

        # Non-reentrant checkpointing (torch's recommendation) needs no input-grad hook and works under DDP.
        ckpt_kwargs = {"use_reentrant": False}
        with warnings.catch_warnings():
            # peft still calls the deprecated gradient_checkpointing_enable name; nothing for users to act on.
            warnings.simplefilter("ignore", FutureWarning)
            if q.mode is not None:
                from peft import prepare_model_for_kbit_training

                # Freezes the base, upcasts non-4-bit params to fp32, enables checkpointing.
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.grad_ckpt,
                                                        gradient_checkpointing_kwargs=ckpt_kwargs)
            else:
                for p in model.parameters():
                    p.requires_grad_(False)
                if cfg.train.grad_ckpt:
                    # As peft does for k-bit models; harmless with non-reentrant checkpointing and needed by
                    # users who switch to reentrant (frozen embeddings give checkpointed blocks no grad input).
                    model.enable_input_require_grads()
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)

        from peft import get_peft_model

        torch.manual_seed(cfg.train.seed)  # adapter init (lora_A kaiming; lora_B zeros)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                # GPT-2's Conv1D: peft sets fan_in_fan_out itself and says so; nothing for users to act on.
                warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
                model = get_peft_model(model, self._lora_config(model))
        except ValueError as e:
            raise LoraDoctorError(f"peft could not apply LoRA to {cfg.model!r}: {str(e).splitlines()[0]}",
                                  f"List the targetable leaves: lora-doctor modules {cfg.model}") from None
        trainable, total = model.get_nb_trainable_parameters()
        if trainable == 0:
            raise LoraDoctorError(f"LoRA targets {cfg.lora.targets!r} made 0 parameters trainable in {cfg.model!r}.",
                                  f"List the targetable leaves: lora-doctor modules {cfg.model}")
        model.train()
        # Leaf names in model order (q, k, v, o, gate, up, down), as plan and check list them.
        leaves = list(dict.fromkeys(n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters()
                                    if ".lora_A." in n))
        n_adapted = len({n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n})
        self.model_info = ModelInfo(
            model=cfg.model, model_type=getattr(model.config, "model_type", "?"), device=self.device, quant=q.mode,
            base_dtype=str(kwargs["dtype"]).removeprefix("torch."), trainable_params=int(trainable),
            all_params=int(total), target_modules=tuple(leaves), n_adapted_modules=n_adapted,
            world_size=self.world_size)
        self.peft_model = model
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.device_index] if self.device == "cuda" else None)
        self.model = model

    def _lora_config(self, model):
        """peft LoraConfig: presets resolved per architecture by introspect (plan uses the same); explicit
        names that only the live model has (e.g. modules added by a hook) go to peft as they are."""
        from peft import LoraConfig

        lora = self.cfg.lora
        names = [t.strip() for t in lora.targets.split(",")] if isinstance(lora.targets, str) else list(lora.targets)
        try:
            from .introspect import load_shape, lora_config
        except ImportError:
            load_shape = None
        if load_shape is not None:
            try:
                shape, _ = load_shape(self.cfg.model, trust_remote_code=self.cfg.trust_remote_code)
                return lora_config(shape, lora)
            except LoraDoctorError:
                live = [n for n, _ in model.named_modules()]
                if not all(any(p == t or p.endswith("." + t) for p in live) for t in names):
                    raise
        targets = "all-linear" if names == ["all-linear"] else names
        return LoraConfig(r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.dropout, use_dora=lora.use_dora,
                          use_rslora=lora.use_rslora, target_modules=targets, task_type="CAUSAL_LM")

    def _setup_data(self) -> None:
        self.data = load_data(self.cfg.data, self.tokenizer, seed=self.cfg.train.seed)

    @property
    def data_stats(self) -> DataStats:
        return self.data.stats

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / (self.cfg.train.batch * self.world_size))

    @property
    def total_steps(self) -> int:
        t = self.cfg.train
        if t.max_steps is not None:
            return t.max_steps
        return max(1, math.ceil(t.epochs * self.micro_batches_per_epoch / t.grad_accum))

    def _setup_optimizer(self) -> None:
        import torch

        t = self.cfg.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optim == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        elif t.optim == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
        else:
            require_bitsandbytes(f"--optim {t.optim}")
            import bitsandbytes as bnb

            # Paging (unified memory that spills optimizer state to the host under pressure) is CUDA-only;
            # on CPU bitsandbytes would warn and fall back to the same non-paged update.
            paged = t.optim == "paged-adamw-8bit" and self.device == "cuda"
            cls = bnb.optim.PagedAdamW8bit if paged else bnb.optim.AdamW8bit
            self.optimizer = cls(params, lr=t.lr, weight_decay=t.weight_decay)
        total, warmup, kind = self.total_steps, t.warmup_steps, t.scheduler

        def factor(step: int) -> float:
            # `step` = optimizer steps already taken; step 0 uses lr * 1/(warmup) with warmup on.
            if warmup and step < warmup:
                return (step + 1) / warmup
            if kind == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if kind == "linear":
                return 1.0 - progress
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        if t.precision == "fp16" and self.device == "cuda":
            self.scaler = torch.amp.GradScaler("cuda")
        self.grad_flow = GradFlowRecorder(self.peft_model)

    # --- one step ------------------------------------------------------------------------------

    def _autocast(self):
        import torch

        p = self.cfg.train.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=torch_dtype(p))

    def _micro_batch(self, index: int) -> list:
        """This rank's examples of global micro-batch `index` (wraps within the epoch so batches stay full)."""
        b, n = self.cfg.train.batch, len(self.data.train)
        bpe = self.micro_batches_per_epoch
        epoch, within = divmod(index, bpe)
        order = self._order(epoch)
        start = within * b * self.world_size + self.rank * b
        return [self.data.train[order[(start + j) % n]] for j in range(b)]

    def _order(self, epoch: int) -> list[int]:
        cached = getattr(self, "_order_cache", None)
        if cached is None or cached[0] != epoch:
            self._order_cache = (epoch, epoch_order(len(self.data.train), self.cfg.train.seed, epoch))
        return self._order_cache[1]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss_step(self, batch: dict, kind: str | None = None):
        """Sum (not mean) of the per-token loss over this micro-batch's labelled tokens.

        Summing lets the step divide by the label tokens of all its micro-batches, so gradient
        accumulation gives the same gradient as one big batch (transformers' num_items_in_batch fix).
        """
        import torch
        import torch.nn.functional as F

        kind = kind or self.cfg.loss.kind
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        # Shift so token t predicts t+1. Upcast to fp32 for a stable log-softmax: (B, T-1, V) fp32 is
        # the largest activation of a small-model step; it is freed right after backward.
        logits = out.logits[:, :-1, :].float()
        labels = batch["labels"][:, 1:]
        flat_logits, flat_labels = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
        if kind == "ce":
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")
        if kind == "label_smoothing":
            return F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum",
                                   label_smoothing=self.cfg.loss.label_smoothing)
        # Focal loss (Lin et al. 2017, eq. 5): -(1 - p_t)^gamma * log p_t, over labelled tokens.
        mask = flat_labels != IGNORE_INDEX
        logp = torch.log_softmax(flat_logits[mask], dim=-1).gather(1, flat_labels[mask].unsqueeze(1)).squeeze(1)
        return (-(1.0 - logp.exp()) ** self.cfg.loss.focal_gamma * logp).sum()

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a signal may reach ranks between different steps)."""
        if self.world_size == 1:
            return bool(flag)
        return self._all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def _one_step(self) -> StepRecord:
        import torch

        t = self.cfg.train
        model, opt = self.model, self.optimizer
        t0 = time.perf_counter()
        micro = [collate(self._micro_batch(self.micro + i), self.data.pad_token_id, self.data.padding_side)
                 for i in range(t.grad_accum)]
        label_tokens = sum(int((m["labels"][:, 1:] != IGNORE_INDEX).sum()) for m in micro)
        tokens = sum(int(m["attention_mask"].sum()) for m in micro)
        # Normalise by the labelled tokens of the whole step on every rank; DDP averages gradients over
        # ranks, hence the world_size factor. A step with no labelled token gives loss 0 and no gradient.
        global_label_tokens = self._all_reduce_sum([float(label_tokens)])[0]
        denom = max(1.0, global_label_tokens / self.world_size)
        loss_sum = None  # kept on the device: one host sync per step, not per micro-batch
        for i, batch in enumerate(micro):
            batch = self._to_device(batch)
            sync = contextlib.nullcontext()
            if self.world_size > 1 and i < len(micro) - 1:
                sync = model.no_sync()  # all-reduce gradients once per optimizer step, not per micro-batch
            with sync:
                with self._autocast():
                    loss = self._loss_step(batch) / denom
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            del loss, batch  # free the graph's last references before the next micro-batch
        self.micro += t.grad_accum
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        max_norm = t.max_grad_norm if t.max_grad_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.grad_flow.record()
        lr = self.scheduler.get_last_lr()[0]
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        with warnings.catch_warnings():
            # fp16: GradScaler skips the optimizer step on overflow (usual in the first steps), and torch then
            # warns that the scheduler stepped first. The schedule counts steps taken, as transformers' does.
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()
        opt.zero_grad(set_to_none=True)
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        loss_total = self._all_reduce_sum([float(loss_sum) * denom])[0]
        step_loss = loss_total / global_label_tokens if global_label_tokens else 0.0
        return StepRecord(step=self.step, loss=step_loss, lr=lr, grad_norm=grad_norm, tokens=int(tokens),
                          label_tokens=int(label_tokens), step_time_s=time.perf_counter() - t0,
                          epoch=self.micro / self.micro_batches_per_epoch)

    def run_steps(self, n: int | None = None, callbacks: Iterable[StepCallback] = (),
                  should_stop: Callable[[], bool] | None = None) -> list[StepRecord]:
        """Run `n` optimizer steps (default: up to total_steps), evaluating every `eval_every`.

        An explicit `n` may run past total_steps (a probe longer than a tiny dataset's epoch); the
        schedule then stays at its final value.

        Callbacks get (engine, record) after each step (progress, logs, checkpoints). `should_stop`
        is polled between steps (a signal handler sets it), so a stop never lands mid-step.

        Raises:
            OutOfMemory: the step did not fit; the message carries the peak seen. No file is written.
        """
        target = self.total_steps if n is None else self.step + n
        done: list[StepRecord] = []
        self.model.train()
        self.monitor.start("train")
        try:
            while self.step < target:
                if should_stop is not None and self._any_rank(should_stop()):
                    break
                record = self._one_step()
                every = self.cfg.train.eval_every
                if every and self.step % every == 0 and self.data.eval:
                    ev = self.evaluate()
                    record = StepRecord(**{**asdict(record), "eval_loss": ev})
                    self.eval_history.append((self.step, ev))
                self.history.append(record)
                done.append(record)
                for cb in callbacks:
                    cb(self, record)
        except Exception as e:
            if not _is_oom(e):
                raise
            peak = self.monitor.current_peak()
            self.monitor.stop()
            self.optimizer.zero_grad(set_to_none=True)
            _empty_cache()
            t = self.cfg.train
            raise OutOfMemory(
                f"Out of memory at step {self.step + 1} with batch {t.batch} x max_length {self.cfg.data.max_length} "
                f"(peak {_fmt(peak)}{', gradient checkpointing off' if not t.grad_ckpt else ''}).",
                f"Try: --batch {max(1, t.batch // 2)} --grad-accum {t.grad_accum * 2}"
                + ("" if t.grad_ckpt else " --grad-ckpt") + ", or a shorter --max-length.") from None
        self.memory["train"] = _merge_memory(self.memory.get("train"), self.monitor.stop())
        return done

    def evaluate(self) -> float:
        """Plain cross-entropy per labelled token on the eval set, whatever the training loss."""
        import torch

        if not self.data.eval:
            raise LoraDoctorError("No evaluation data.", "Set data.eval_path or data.eval_fraction: 0.1")
        self._eval_mode()
        b = self.cfg.train.batch
        batches = [self.data.eval[i:i + b] for i in range(0, len(self.data.eval), b)]
        batches = batches[self.rank::self.world_size]
        if self.cfg.train.eval_batches:
            batches = batches[:self.cfg.train.eval_batches]
        total, count = 0.0, 0
        with torch.no_grad():
            for ex in batches:
                batch = self._to_device(collate(ex, self.data.pad_token_id, self.data.padding_side))
                with self._autocast():
                    total += float(self._loss_step(batch, kind="ce"))
                count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        self.model.train()
        total, count = self._all_reduce_sum([total, float(count)])
        return total / count if count else float("nan")

    def _eval_mode(self) -> None:
        """model.eval(), except bitsandbytes 4-bit layers on CPU stay in train mode.

        bitsandbytes' Linear4bit.forward on CPU, in eval mode under no_grad, repacks its weight in place
        into a CPU-only layout (`_convert_weight_packed_for_cpu`); training afterwards runs through that
        layout (its gemv has no autograd kernel) and the loss drifts from an un-evaluated run. Linear4bit
        has no dropout, so train mode changes nothing else for it.
        """
        self.model.eval()
        if self.device != "cpu" or self.cfg.quant.mode is None:
            return
        import bitsandbytes as bnb

        for m in self.model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.training = True

    # --- results -------------------------------------------------------------------------------

    def result(self, kind: str, *, stopped_early: str | None = None, error: str | None = None,
               extra: dict | None = None) -> RunResult:
        grad_flow = self.grad_flow.finish() if self.grad_flow is not None else None
        memory = {k: v for k, v in self.memory.items()}
        return RunResult(kind=kind, config=self.cfg.to_dict(), model=self.model_info, data=self.data.stats,
                         memory=memory, steps=tuple(self.history), grad_flow=grad_flow,
                         loss=loss_stats([s.loss for s in self.history]), throughput=throughput(self.history),
                         eval_losses=tuple(self.eval_history), stopped_early=stopped_early, error=error,
                         duration_s=time.perf_counter() - self._t_start, extra=dict(extra or {}))

    def trainable_state(self) -> dict:
        """The adapter weights (every requires_grad parameter), by their peft names, on CPU."""
        return {n: p.detach().to("cpu").contiguous() for n, p in self.peft_model.named_parameters() if p.requires_grad}

    # --- checkpoints ---------------------------------------------------------------------------

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output.dir)

    def save_checkpoint(self, root: str | os.PathLike | None = None) -> Path | None:
        """Write a resumable checkpoint atomically: a temp folder, fsync'd, then renamed into place.

        Contents: adapter weights (safetensors), optimizer + scheduler + scaler state, RNG states,
        the data position and the history. Only the main process writes.
        """
        import torch
        from safetensors.torch import save_file

        root = Path(root) if root is not None else self.output_dir / CHECKPOINT_DIR
        final = root / f"step-{self.step:06d}"
        self._barrier()
        if not self.is_main:
            self._barrier()
            return final
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            save_file(self.trainable_state(), str(tmp / WEIGHTS_FILE))
            state = {
                "step": self.step, "micro": self.micro, "world_size": self.world_size,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "rng": _rng_state(),
                "history": [asdict(s) for s in self.history], "eval_history": list(self.eval_history),
            }
            torch.save(state, tmp / STATE_FILE)
            write_json_atomic(tmp / "run_config.json", self.cfg.to_dict())
            for f in tmp.iterdir():
                _fsync(f)
            if final.exists():  # re-saving the same step (e.g. signal right after a periodic save)
                old = root / f".old-{final.name}-{os.getpid()}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            write_text_atomic(root / "latest", final.name + "\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune_checkpoints(root)
        self._barrier()
        return final

    def _prune_checkpoints(self, root: Path) -> None:
        done = sorted(p for p in root.glob("step-*") if p.is_dir())
        for old in done[:-self.cfg.output.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore adapter weights, optimizer, scheduler, RNG, data position and history from `path`."""
        import torch
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / STATE_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise LoraDoctorError(f"'{path}' is not a lora-doctor checkpoint (no {STATE_FILE}).",
                                  f"Checkpoints live in {self.output_dir / CHECKPOINT_DIR}/step-NNNNNN.")
        saved_cfg = path / "run_config.json"
        if saved_cfg.is_file():
            changed = _trajectory_changes(json.loads(saved_cfg.read_text(encoding="utf-8")), self.cfg.to_dict())
            if changed:
                raise LoraDoctorError(
                    f"Checkpoint '{path}' was written with a different config: {', '.join(changed)}.",
                    "Resume with the same settings (only steps/epochs, eval, save, log and output keys may change), "
                    "or start a new run in another --output-dir.")
        weights = load_file(str(path / WEIGHTS_FILE))
        params = dict(self.peft_model.named_parameters())
        missing = [n for n in weights if n not in params]
        if missing:
            raise LoraDoctorError(f"Checkpoint '{path}' does not match this config: unknown adapter weight {missing[0]!r}.",
                                  "Resume with the run_config.json saved next to the checkpoint.")
        with torch.no_grad():
            for n, w in weights.items():
                params[n].copy_(w.to(params[n].device, params[n].dtype))
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
        if state.get("world_size", 1) != self.world_size:
            raise LoraDoctorError(f"Checkpoint '{path}' was written with {state.get('world_size')} processes; this run has {self.world_size}.",
                                  "Resume with the same number of processes (the data order depends on it).")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.micro = state["step"], state["micro"]
        self.history = [StepRecord(**s) for s in state["history"]]
        self.eval_history = [tuple(x) for x in state["eval_history"]]
        _set_rng_state(state["rng"])
        # Grad-flow deltas are measured from here on.
        self.grad_flow = GradFlowRecorder(self.peft_model)

    def latest_checkpoint(self) -> Path | None:
        root = self.output_dir / CHECKPOINT_DIR
        pointer = root / "latest"
        if pointer.is_file():
            p = root / pointer.read_text().strip()
            if (p / STATE_FILE).is_file():
                return p
        done = sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())
        return done[-1] if done else None

    def save_adapter(self, path: str | os.PathLike | None = None) -> Path:
        """peft's save_pretrained (adapter_model.safetensors + adapter_config.json), atomically."""
        path = Path(path) if path is not None else self.output_dir / ADAPTER_DIR
        if self.is_main:
            _atomic_dir(path, lambda tmp: (self.peft_model.save_pretrained(str(tmp), safe_serialization=True),
                                           self.tokenizer.save_pretrained(str(tmp))))
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


# --- merge ----------------------------------------------------------------------------------------


def merge_adapter(cfg: RunConfig, adapter_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> Path:
    """Merge a saved adapter into a freshly loaded 16-bit base and save it (atomically).

    The base is reloaded unquantized on CPU in `output.merge_dtype`: merging into 4-bit weights would
    requantize W + BA and silently lose the update, so this never merges into the training model.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = cfg.output.merge_dtype
    if dtype not in TORCH_DTYPES:
        raise LoraDoctorError(f"Cannot merge into {dtype!r}: only a 16/32-bit base can be merged.",
                              "Set output.merge_dtype: bf16 (the base is reloaded unquantized for the merge).")
    out = Path(out_dir) if out_dir is not None else Path(cfg.output.dir) / MERGED_DIR
    local = Path(cfg.model).expanduser()
    with quiet_transformers():
        base = AutoModelForCausalLM.from_pretrained(str(local.resolve()) if local.is_dir() else cfg.model, dtype=torch_dtype(dtype), device_map={"": "cpu"},
                                                    trust_remote_code=cfg.trust_remote_code)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise LoraDoctorError(f"The base {cfg.model!r} loads quantized, so merging would go into 4/8-bit weights.",
                              "Point --model at the unquantized (16-bit) checkpoint for the merge.")
    with quiet_transformers():
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tok = AutoTokenizer.from_pretrained(str(adapter_dir))
    with torch.no_grad(), quiet_transformers():
        _atomic_dir(out, lambda tmp: (merged.save_pretrained(str(tmp), safe_serialization=True),
                                      tok.save_pretrained(str(tmp))))
    return out


# --- helpers --------------------------------------------------------------------------------------


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


def _atomic_dir(final: Path, write: Callable[[Path], object]) -> None:
    """Write a folder via `write(tmp)`, then swap it into place; a crash leaves the old folder or none."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        for f in tmp.iterdir():
            if f.is_file():
                _fsync(f)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Keys that may change between a run and its resumption without changing the trajectory so far.
RESUMABLE_CHANGES = ("train.max_steps", "train.epochs", "train.eval_every", "train.eval_batches", "train.save_every",
                     "train.log_every", "train.device", "output.", "data.eval_path")


def _trajectory_changes(old: dict, new: dict) -> list[str]:
    """Dotted keys whose value differs between two RunConfig dicts, ignoring RESUMABLE_CHANGES."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
        return out

    a, b = flat(old), flat(new)
    keys = sorted(set(a) | set(b))
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys
            if a.get(k) != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)]


def _merge_memory(a: MemoryStats | None, b: MemoryStats) -> MemoryStats:
    """One 'train' phase over several run_steps calls: the larger peaks, the first start, summed time."""
    if a is None:
        return b

    def top(x, y):
        return y if x is None else x if y is None else max(x, y)

    return MemoryStats(phase=b.phase, device=b.device, peak_allocated_bytes=top(a.peak_allocated_bytes, b.peak_allocated_bytes),
                       peak_reserved_bytes=top(a.peak_reserved_bytes, b.peak_reserved_bytes),
                       nvml_peak_used_bytes=top(a.nvml_peak_used_bytes, b.nvml_peak_used_bytes),
                       peak_rss_bytes=top(a.peak_rss_bytes, b.peak_rss_bytes), start_rss_bytes=a.start_rss_bytes,
                       duration_s=(a.duration_s or 0) + (b.duration_s or 0))


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _rng_state() -> dict:
    import numpy as np
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            # This process's GPU only: get_rng_state_all() would create a CUDA context (hundreds of MiB)
            # on every visible GPU, i.e. on the other DDP ranks' devices.
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    cuda_state = state.get("cuda")
    if cuda_state is not None and torch.cuda.is_available():
        if isinstance(cuda_state, (list, tuple)):  # older checkpoints: one state per visible GPU
            index = torch.cuda.current_device()
            cuda_state = cuda_state[index] if index < len(cuda_state) else None
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state)  # the current device: this process's


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(n: int | None) -> str:
    from .report import format_bytes

    return format_bytes(n)


def _model_error(model: str, e: Exception) -> LoraDoctorError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if Path(model).exists():
        have = sorted(p.name for p in Path(model).iterdir())[:12] if Path(model).is_dir() else []
        return LoraDoctorError(f"Cannot load model {model!r}: {first}",
                               f"The folder holds: {', '.join(have) or 'nothing'}; it needs config.json, weights and "
                               "tokenizer files (save_pretrained writes them). python examples/make_tiny_model.py "
                               "writes a tiny one.")
    return LoraDoctorError(f"Cannot load model {model!r}: {first}",
                           "Give a local folder (save_pretrained output) or a hub id already in the HF cache; "
                           "python examples/make_tiny_model.py writes a tiny one offline.")


def write_loss_log(path: str | os.PathLike, records: Iterable[StepRecord]) -> Path:
    """The per-step log as JSON Lines (one StepRecord per line), written atomically."""
    return write_text_atomic(path, "".join(json.dumps(r.to_dict()) + "\n" for r in records))


__all__ = ["Engine", "OutOfMemory", "merge_adapter", "write_loss_log", "require_bitsandbytes", "resolve_device"]
