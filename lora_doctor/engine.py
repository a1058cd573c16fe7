"""The one engine behind `probe` and `train`: set up, then run optimizer steps.

A recipe in torchtune's style: `setup()` runs `_resolve_model`, `_setup_tokenizer`, `_setup_data`,
`_setup_model` and `_setup_optimizer`; `run_steps(n, callbacks)` runs `_one_step`s (a `_loss_step` per
micro-batch, then `_optimizer_step`); `evaluate()` is plain cross-entropy on the eval set. The pieces
live beside it: loading.py (config, tokenizer, peft model), optim.py (loss, optimizer, schedule),
distributed.py (rank, DDP, collectives), checkpoint.py (files), gradflow.py and measure.py (numbers).
`probe` and `train` differ only in how many steps they run and which callbacks they pass.

Determinism: the adapter init, LoRA dropout and data order all derive from `train.seed`. The data
order of epoch e is a permutation seeded by (seed, e), so the data position is just a counter; a
checkpoint stores that counter, the RNG states, the optimizer and the scheduler. Under DDP or FSDP each
rank takes its slice of every global micro-batch, and only the main process writes files.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterable

from . import checkpoint, fsdp_state
from .checkpoint import ADAPTER_DIR, CHECKPOINT_DIR
from .checks.datafacts import optimizer_steps, refusal_finding
from .data import TokenizedData, collate, epoch_order, load_data
from .distributed import place_process
from .fsdp import check_fsdp, gathered_trainable
from .errors import BadData, LoraDoctorError  # noqa: F401  (BadData: probe catches it here)
from .gradflow import GradFlowRecorder
from .loading import (compute_dtype, eval_mode, is_oom, load_peft_model, load_tokenizer, peft_lora_config,
                      preload_libraries, resolve_source, torch_dtype)
from .measure import MemoryMonitor, MemoryStats, RunResult, StepRecord, loss_stats, merged_memory, throughput
from .lossfn import build_loss
from .optim import build_optimizer, build_scheduler, label_token_count, optimizer_step
from .report import format_bytes  # no torch, no I/O: the one place bytes become text
from .runconfig import RunConfig

StepCallback = Callable[["Engine", StepRecord], None]


class OutOfMemory(LoraDoctorError):
    """The run did not fit: raised with the peak memory seen and what to change."""


class Engine:
    """Load once, then run optimizer steps. Build with a RunConfig, call `setup()`, then `run_steps()`.

    Args:
        cfg: the validated run config.
        model_hook: applied to the loaded base model before LoRA; tests use it to plant faults
            (e.g. a module that never feeds the loss).
        base_loader: builds the base model instead of from_pretrained (loading.load_peft_model's base_loader).
    """

    def __init__(self, cfg: RunConfig, *, model_hook: Callable | None = None, base_loader: Callable | None = None):
        self.cfg = cfg
        self.model_hook = model_hook
        self.base_loader = base_loader
        self.model = None
        """What the steps call: lossfn.CausalLMLoss over the peft model (ids, labels -> summed loss),
        DDP-wrapped when world_size > 1, so the wrapper's hooks fire around the whole loss."""
        self.peft_model = None
        """The peft model itself: weights, adapters, save_pretrained."""
        self.levers_off: dict[str, str] = {}
        """Config levers the engine had to switch off, with why (lossfn.build_loss's self-check)."""
        self.tokenizer = None
        self.source = None
        """loading.ModelSource: the model's config, resolved once."""
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
        self._note = None
        self._order_cache: tuple[int, list[int]] | None = None
        self._t_start = time.perf_counter()
        self._setup_distributed()
        self.monitor = MemoryMonitor(self.device)

    # --- setup ---------------------------------------------------------------------------------

    def _setup_distributed(self) -> None:
        self.placement = place_process(self.cfg.train.device, self.cfg.train.distributed)
        p = self.placement
        self.device, self.device_index, self.is_main = p.device, p.device_index, p.is_main
        self.rank, self.local_rank, self.world_size = p.rank, p.local_rank, p.world_size

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
        preload_libraries(self.cfg)  # before the baseline, so CPU RSS measures the run, not the imports
        if log is not None:
            log(f"loading {self.cfg.model} ({self.cfg.quant.mode or 'no quantization'}, {self.device}) ...")
        self.monitor.start("load", roots=self._tensor_roots)
        try:
            self._setup_model()
        except BaseException as e:
            peak = self.monitor.current_peak()
            self.monitor.stop()
            if is_oom(e):
                raise OutOfMemory(f"Out of memory while loading {self.cfg.model!r} (peak {format_bytes(peak)}).",
                                  "Use --quant nf4, a smaller model, or a GPU with more memory.") from None
            raise
        self.memory["load"] = self.monitor.stop()
        self._setup_optimizer()
        return self

    def _tensor_roots(self) -> tuple:
        """What holds the tensors alive between steps: the CPU tensor peak's baseline (measure.MemoryMonitor)."""
        return self.peft_model, self.optimizer

    def _resolve_model(self) -> None:
        self.source = resolve_source(self.cfg, hooked=self.model_hook is not None)
        if self.placement.sharded:
            check_fsdp(self.cfg, self.device, self.base_config)  # before any weight loads

    @property
    def base_config(self):
        """The model's transformers config as saved (resolved once, by resolve.py)."""
        return self.source.config if self.source is not None else None

    def _setup_tokenizer(self) -> None:
        self.tokenizer = load_tokenizer(self.cfg, self.source)

    def _setup_data(self) -> None:
        self.data = load_data(self.cfg.data, self.tokenizer, seed=self.cfg.train.seed, model_id=self.cfg.model,
                              embedding_rows=getattr(self.base_config, "vocab_size", None))
        # An id past the embedding rows or the positions is an IndexError inside a step: refuse it before the load.
        bad = refusal_finding(self.data.examples + self.data.eval, getattr(self.source, "shape", None),
                              self.base_config, self.cfg.lora.trainable_token_indices)
        if bad is not None:
            raise BadData(bad.message, bad.hint, bad.code)

    def _setup_model(self) -> None:
        # FSDP: the base loads on CPU and fully_shard moves each unit's 1/N to this rank's GPU (fsdp.py).
        sharded = self.placement.sharded
        self.peft_model, info = load_peft_model(
            self.cfg, "cpu" if sharded else self.device, source=self.source, device_index=None if sharded else
            self.device_index, world_size=self.world_size, model_hook=self.model_hook, note=self._note, fsdp=sharded,
            base_loader=self.base_loader)
        self.model_info = replace(info, device=self.device)
        # The chunked head's self-check runs before sharding; on a GPU run the still-unsharded base is on the
        # host, where one forward of a large 4-bit model costs minutes, so it is skipped there (and said).
        loss_fn, self.levers_off = build_loss(self.peft_model, self.cfg, "cpu" if sharded else self.device,
                                              autocast=self._autocast, note=self._note,
                                              check=not (sharded and self.device == "cuda"))
        self.model = self.placement.wrap(loss_fn, compute_dtype(self.cfg))

    def _lora_config(self, model):
        """The peft LoraConfig this engine applies (bench builds its Trainer baseline with the same)."""
        return peft_lora_config(self.cfg, self.source, model)

    @property
    def micro_batches_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / (self.cfg.train.batch * self.world_size))

    @property
    def total_steps(self) -> int:
        # The one formula check's schedule findings use too, so check and train count the same steps.
        t = self.cfg.train
        return optimizer_steps(len(self.data.train), t.batch, self.world_size, t.grad_accum, t.epochs, t.max_steps)

    def _setup_optimizer(self) -> None:
        import torch

        t = self.cfg.train
        self.optimizer = build_optimizer([p for p in self.model.parameters() if p.requires_grad], t, self.device)
        self.scheduler = build_scheduler(self.optimizer, t, self.total_steps)
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
        epoch, within = divmod(index, self.micro_batches_per_epoch)
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, epoch_order(n, self.cfg.train.seed, epoch))
        order = self._order_cache[1]
        start = within * b * self.world_size + self.rank * b
        return [self.data.train[order[(start + j) % n]] for j in range(b)]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _loss_step(self, batch: dict, kind: str | None = None):
        """One micro-batch's forward: the summed loss over its labelled tokens (lossfn.CausalLMLoss).

        Packed rows carry no attention_mask: their position_ids give transformers the block-diagonal mask."""
        return self.model(**batch, kind=kind or self.cfg.loss.kind, loss=self.cfg.loss)

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank if it is true on one (a signal may reach ranks between different steps)."""
        return self.placement.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def _backward(self, micro: list[dict], denom: float):
        """Forward and backward over the step's micro-batches; returns the summed loss / denom, on the device."""
        loss_sum = None  # kept on the device: one host sync per step, not per micro-batch
        for i, batch in enumerate(micro):
            batch = self._to_device(batch)
            # Reduce gradients across ranks once per optimizer step, not per micro-batch.
            with self.placement.no_sync(self.model) if i < len(micro) - 1 else contextlib.nullcontext():
                with self._autocast():
                    loss = self._loss_step(batch) / denom
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            del loss, batch  # free the graph's last references before the next micro-batch
        return loss_sum

    def _optimizer_step(self) -> tuple[float, float]:
        """Step (optim.optimizer_step), recording per-module gradient norms before clipping for the doctor."""
        return optimizer_step(self.optimizer, self.scheduler, self.scaler, self.cfg.train.max_grad_norm,
                              before_clip=self.grad_flow.record)

    def _one_step(self) -> StepRecord:
        import torch

        t0 = time.perf_counter()
        accum = self.cfg.train.grad_accum
        rows = [self._micro_batch(self.micro + i) for i in range(accum)]
        micro = [collate(r, self.data.pad_token_id, self.data.padding_side) for r in rows]
        label_tokens = sum(label_token_count(m["labels"]) for m in micro)
        tokens = sum(len(e.input_ids) for r in rows for e in r)  # real tokens: packed rows have no attention_mask
        # Normalise by the labelled tokens of the whole step on every rank; DDP averages gradients over
        # ranks, hence the world_size factor. A step with no labelled token gives loss 0 and no gradient.
        global_label_tokens = self.placement.all_reduce_sum([float(label_tokens)])[0]
        denom = max(1.0, global_label_tokens / self.world_size)
        loss_sum = self._backward(micro, denom)
        self.micro += accum
        grad_norm, lr = self._optimizer_step()
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.step += 1
        loss_total = self.placement.all_reduce_sum([float(loss_sum) * denom])[0]
        step_loss = loss_total / global_label_tokens if global_label_tokens else 0.0
        return StepRecord(step=self.step, loss=step_loss, lr=lr, grad_norm=grad_norm, tokens=int(tokens),
                          label_tokens=int(label_tokens), step_time_s=time.perf_counter() - t0,
                          epoch=self.micro / self.micro_batches_per_epoch)

    # --- the loop ------------------------------------------------------------------------------

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
        self.monitor.start("train", roots=self._tensor_roots)
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
        except BaseException as e:  # a KeyboardInterrupt too: the monitor must leave the tracker's dispatch mode
            if not is_oom(e):
                self.monitor.stop()
                raise
            raise self._step_oom() from None
        self.memory["train"] = merged_memory(self.memory.get("train"), self.monitor.stop())
        return done

    def _step_oom(self) -> OutOfMemory:
        """Stop measuring, free what the failed step held, and say what to change."""
        import torch

        peak = self.monitor.current_peak()
        self.monitor.stop()
        self.optimizer.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t = self.cfg.train
        return OutOfMemory(
            f"Out of memory at step {self.step + 1} with batch {t.batch} x max_length {self.cfg.data.max_length} "
            f"(peak {format_bytes(peak)}{', gradient checkpointing off' if not t.grad_ckpt else ''}).",
            f"Try: --batch {max(1, t.batch // 2)} --grad-accum {t.grad_accum * 2}"
            + ("" if t.grad_ckpt else " --grad-ckpt") + ", or a shorter --max-length"
            + ("" if t.offload_activations else ", or --set train.offload_activations=true") + ".")

    def evaluate(self) -> float:
        """Plain cross-entropy per labelled token on the eval set, whatever the training loss."""
        import torch

        if not self.data.eval:
            raise LoraDoctorError("No evaluation data.", "Set data.eval_path or data.eval_fraction: 0.1")
        eval_mode(self.model, self.device, self.cfg.quant.mode)
        b = self.cfg.train.batch
        every = [self.data.eval[i:i + b] for i in range(0, len(self.data.eval), b)]
        cap = self.cfg.train.eval_batches or len(every)
        batches = every[self.rank::self.world_size][:cap]
        # FSDP all-gathers in every forward: a rank with fewer batches runs the first one again, uncounted.
        runs = min(math.ceil(len(every) / self.world_size), cap) if self.placement.sharded else len(batches)
        total, count = 0.0, 0
        with torch.no_grad():
            for i, ex in enumerate(batches + every[:1] * (runs - len(batches))):
                batch = self._to_device(collate(ex, self.data.pad_token_id, self.data.padding_side))
                with self._autocast():
                    loss = float(self._loss_step(batch, kind="ce"))
                if i < len(batches):
                    total, count = total + loss, count + label_token_count(batch["labels"])
        self.model.train()
        total, count = self.placement.all_reduce_sum([total, float(count)])
        return total / count if count else float("nan")

    # --- results -------------------------------------------------------------------------------

    def result(self, kind: str, *, stopped_early: str | None = None, error: str | None = None,
               extra: dict | None = None) -> RunResult:
        grad_flow = self.grad_flow.finish() if self.grad_flow is not None else None
        return RunResult(kind=kind, config=self.cfg.to_dict(), model=self.model_info, data=self.data.stats,
                         memory=dict(self.memory), steps=tuple(self.history), grad_flow=grad_flow,
                         loss=loss_stats([s.loss for s in self.history]), throughput=throughput(self.history),
                         eval_losses=tuple(self.eval_history), stopped_early=stopped_early, error=error,
                         duration_s=time.perf_counter() - self._t_start,
                         extra={**({"levers_off": dict(self.levers_off)} if self.levers_off else {}), **(extra or {})})

    def trainable_state(self) -> dict:
        """The adapter weights (requires_grad parameters) by peft name, whole, on CPU; collective under FSDP."""
        return gathered_trainable(self.peft_model)

    # --- checkpoints (checkpoint.py does the I/O) ----------------------------------------------

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output.dir)

    def save_checkpoint(self, root: str | os.PathLike | None = None) -> Path:
        """Write a resumable checkpoint atomically (checkpoint.py); only the main process writes."""
        root = Path(root) if root is not None else self.output_dir / CHECKPOINT_DIR
        if self.placement.sharded:
            return fsdp_state.save_sharded_checkpoint(self, root)
        final = root / f"step-{self.step:06d}"
        self.placement.barrier()
        if self.is_main:
            final = checkpoint.save_checkpoint(root, self.step, self.trainable_state(), checkpoint.engine_state(self),
                                               self.cfg.to_dict(), keep=self.cfg.output.keep_checkpoints)
        self.placement.barrier()
        return final

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore adapter weights, optimizer, scheduler, RNG, data position and history from `path`."""
        (fsdp_state.restore_sharded if self.placement.sharded else checkpoint.restore_engine)(self, path)
        self.grad_flow = GradFlowRecorder(self.peft_model)  # grad-flow deltas are measured from here on

    def latest_checkpoint(self) -> Path | None:
        return checkpoint.latest_checkpoint(self.output_dir / CHECKPOINT_DIR)

    def save_adapter(self, path: str | os.PathLike | None = None) -> Path:
        """peft's save_pretrained and the tokenizer, atomically (checkpoint.save_adapter); main process only."""
        path = Path(path) if path is not None else self.output_dir / ADAPTER_DIR
        if self.placement.sharded:
            return fsdp_state.save_gathered_adapter(self, path)
        if self.is_main:
            checkpoint.save_adapter(self.peft_model, self.tokenizer, path)
        self.placement.barrier()
        return path


__all__ = ["Engine", "OutOfMemory"]
