"""Engine step time vs plain peft + transformers Trainer on the same model, data and QLoRA setup;
and plan's predicted peak memory vs the engine's measured peak. Not a test.

    python bench/bench_engine.py                 # tiny random Llama, nf4 QLoRA, CPU or CUDA
    python bench/bench_engine.py --steps 40 --size small --quant none

Both sides get the same tokenized examples (lora_doctor.data), the same collator, the same
BitsAndBytesConfig, prepare_model_for_kbit_training, LoraConfig, optimizer, lr, clipping and seed.
Step time is the median over steps after `--warmup`, timed around each optimizer step (a
TrainerCallback on the Trainer side), the engine's without the CPU tensor tracker (see time_engine).
Target (issue 9): engine / Trainer <= 1.0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")

SIZES = {
    "tiny": {},
    "small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4),
}
HERE = Path(__file__).resolve().parent.parent
TARGET_RATIO = 1.0
"""issue 9: the engine's step time at most the Trainer's."""


def make_config(model_dir: Path, out: Path, args) -> "RunConfig":  # noqa: F821
    from lora_doctor.runconfig import from_dict

    return from_dict({
        "model": str(model_dir),
        "quant": {"mode": None if args.quant == "none" else args.quant, "compute_dtype": args.precision},
        "lora": {"r": 16, "dropout": 0.05, "targets": "all-linear"},
        "data": {"path": str(HERE / "examples" / "data" / "tiny.jsonl"), "max_length": args.max_length},
        "train": {"batch": args.batch, "max_steps": args.steps, "lr": 2e-4, "optim": args.optim,
                  "grad_ckpt": True, "precision": args.precision, "device": args.device},
        "output": {"dir": str(out / "run")},
    })


def time_engine(cfg, warmup: int) -> tuple[list[float], object]:
    """Per-step times of the engine's own loop (Engine.run_steps). The first `warmup` steps (left out of the
    median) run under probe's CPU tensor tracker, which gives the memory figure; the timed steps run without it:
    its Python call per aten op is measurement, not the engine, and the Trainer side has none."""
    from lora_doctor.engine import Engine

    engine = Engine(cfg).setup()
    engine.run_steps(warmup)
    engine.monitor.tensor_peak = False  # public MemoryMonitor switch, read at the next phase start
    engine.run_steps(cfg.train.max_steps - warmup)
    return [s.step_time_s for s in engine.history], engine


def trainer_model(cfg, device: str):
    """The peft model as a plain peft + transformers user prepares it: from_pretrained (with the same
    BitsAndBytesConfig), prepare_model_for_kbit_training (fp32 upcast of the non-4-bit weights), gradient
    checkpointing, get_peft_model with the engine's LoraConfig."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from lora_doctor.loading import peft_lora_config, resolve_source, torch_dtype

    q, t = cfg.quant, cfg.train
    kwargs = {"dtype": torch_dtype(q.compute_dtype if q.mode else t.precision)}
    if q.mode:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.mode, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype))
    torch.manual_seed(t.seed)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, device_map={"": 0 if device == "cuda" else "cpu"},
                                                 **kwargs)
    model.config.use_cache = False
    ckpt = {"use_reentrant": False}
    if q.mode:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.grad_ckpt,
                                                gradient_checkpointing_kwargs=ckpt)
    else:
        model.requires_grad_(False)
        if t.grad_ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
    return get_peft_model(model, peft_lora_config(cfg, resolve_source(cfg), model))


def make_trainer(cfg, engine, model, out: str, callbacks=()):
    """transformers.Trainer over the engine's tokenized examples and collator, with the engine's optimizer,
    lr, clipping, precision and seed."""
    import torch
    from transformers import Trainer, TrainingArguments

    from lora_doctor.data import collate

    t, device = cfg.train, engine.device
    examples = engine.data.train

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=t.batch, gradient_accumulation_steps=t.grad_accum,
        max_steps=t.max_steps, learning_rate=t.lr, lr_scheduler_type="constant", warmup_steps=0,
        optim={"paged-adamw-8bit": "paged_adamw_8bit", "adamw-8bit": "adamw_bnb_8bit", "adamw": "adamw_torch",
               "sgd": "sgd"}[t.optim],
        max_grad_norm=t.max_grad_norm, bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=t.seed,
        use_cpu=device == "cpu", dataloader_num_workers=0, remove_unused_columns=False)
    return Trainer(model=model, args=args, train_dataset=Examples(),
                   data_collator=lambda b: collate(b, engine.data.pad_token_id, engine.data.padding_side),
                   callbacks=list(callbacks))


def time_trainer(cfg, engine) -> list[float]:
    """The same steps with transformers.Trainer on an identically prepared peft model."""
    import torch
    from transformers import TrainerCallback

    device = engine.device
    model = trainer_model(cfg, device)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(cfg, engine, model, out, [Timer()])
        trainer.train()
        if not times:
            raise RuntimeError(f"Trainer ran {trainer.state.global_step} steps and no step callback fired")
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny",
                    help="tiny: lora_doctor.tiny's Llama (64 wide, 2 layers); small: 256 wide, 4 layers.")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="Steps excluded from the median.")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--quant", choices=("nf4", "fp4", "none"), default="nf4")
    ap.add_argument("--optim", default="paged-adamw-8bit")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--rounds", type=int, default=2, help="Alternate engine/Trainer this many times.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lora_doctor.diagnose import measured_peak_bytes, planned_for_device, predict_memory
    from lora_doctor.report import format_bytes
    from lora_doctor.report.memory import MEASURED_WORDS, PLAN_WORDS
    from lora_doctor.tiny import save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = save_tiny_model(tmp / "model", "llama", **SIZES[args.size])
        cfg = make_config(model_dir, tmp, args)
        engine_times, trainer_times = [], []
        result = None
        for _ in range(args.rounds):
            times, engine = time_engine(cfg, args.warmup)
            # Memory from the first round only: later rounds reuse memory the allocator already holds.
            result = result or engine.result("probe")
            engine_times.append(statistics.median(times[args.warmup:]))
            trainer_times.append(statistics.median(time_trainer(cfg, engine)[args.warmup:]))
        measured, measured_basis = measured_peak_bytes(result)
        what = MEASURED_WORDS[measured_basis]
        prediction = predict_memory(cfg)
    e, t = min(engine_times), min(trainer_times)
    out = {
        "device": engine.device, "size": args.size, "quant": args.quant, "steps": args.steps,
        "batch": args.batch, "max_length": args.max_length, "trainable_params": result.model.trainable_params,
        "engine_median_step_s": e, "trainer_median_step_s": t, "ratio": e / t,
        "engine_rounds_s": engine_times, "trainer_rounds_s": trainer_times,
        "predicted_peak_bytes": prediction.total_bytes, "measured_peak_bytes": measured,
        "measured_what": what,
        "predicted_runtime_overhead_bytes": prediction.terms.get("runtime_overhead_bytes"),
        # What probe compares with the measurement: on CPU without the CUDA-only runtime overhead.
        "planned_for_device_bytes": planned_for_device(prediction, result.model.device)[0],
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"device {out['device']}, {args.size} Llama, {args.quant}, batch {args.batch} x {args.max_length} tokens, "
          f"{result.model.trainable_params:,} trainable params, median of steps {args.warmup + 1}..{args.steps}, "
          f"best of {args.rounds} rounds")
    print(f"  engine          {e * 1000:8.2f} ms/step")
    print(f"  peft + Trainer  {t * 1000:8.2f} ms/step")
    print(f"  ratio           {e / t:8.3f}x  (target <= {TARGET_RATIO}x: {'met' if e / t <= TARGET_RATIO else 'NOT met'})")
    # The figure probe reports: tensors only (no CUDA context or allocator slack), held against process RSS
    # on CPU and torch.cuda.max_memory_allocated on CUDA.
    pred, _, basis = planned_for_device(prediction, result.model.device)
    err = f"{100 * (pred - measured) / measured:+.1f}%" if pred and measured else "—"
    label = f" ({PLAN_WORDS[basis]})" if basis else ""
    print(f"  peak memory     planned {format_bytes(pred)}{label}, measured {format_bytes(measured)} ({what}); "
          f"plan error {err}")
    if basis:
        print(f"                  with runtime overhead the plan is {format_bytes(out['predicted_peak_bytes'])}")


if __name__ == "__main__":
    main()
