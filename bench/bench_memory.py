"""Measured tensor peak of one lora-doctor engine step vs the same step in plain peft + transformers Trainer,
on CPU, with the exact live-tensor tracker (lora_doctor/tensorpeak.py). Not a test.

    python bench/bench_memory.py                       # mid-size random Llama: 4 x 512, vocab 32k, 4 x 1024 tokens
    python bench/bench_memory.py --arch qwen2 --vocab 64000 --no-grad-ckpt

Both sides get the same random model (lora_doctor.tiny.save_mid_model), the same tokenized rows (every one
truncated to --max-length), the same BitsAndBytesConfig, LoraConfig, optimizer, precision and seed
(bench_engine.py's Trainer baseline). Each peak counts everything alive: weights, 4-bit quant state, adapters,
optimizer state, activations, logits and gradients, as torch.cuda.max_memory_allocated would on a GPU.
Target (issue 9): engine <= 0.5x Trainer at vocab >= 32k.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_engine, run as a script

TARGET_RATIO = 0.5
"""issue 9: the engine's step peak at most half the Trainer's at vocab >= 32k."""


def make_config(tmp: Path, args):
    from lora_doctor.runconfig import from_dict
    from lora_doctor.tiny import save_mid_model, write_long_text_data

    model = save_mid_model(tmp / "model", args.arch, vocab_size=args.vocab)
    data = write_long_text_data(tmp / "data.jsonl", n_examples=max(8, args.batch))
    return from_dict({
        "model": str(model),
        "data": {"path": str(data), "format": "text", "max_length": args.max_length},
        "train": {"batch": args.batch, "max_steps": 1, "grad_ckpt": args.grad_ckpt, "device": "cpu"},
        "output": {"dir": str(tmp / "run")},
    })


def engine_peak(cfg):
    """(the engine, its train-phase tensor peak): one optimizer step with the engine's defaults."""
    from lora_doctor.engine import Engine

    engine = Engine(cfg).setup()
    engine.run_steps(1)
    return engine, engine.memory["train"].peak_tensor_bytes


def trainer_peak(cfg, engine) -> int:
    """The tensor peak of Trainer.train() for one step, the prepared model's tensors counted from the start."""
    from bench_engine import make_trainer, trainer_model

    from lora_doctor.tensorpeak import TensorPeakTracker

    model = trainer_model(cfg, "cpu")
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(cfg, engine, model, out)
        tracker = TensorPeakTracker("cpu")
        tracker.add_roots([model])
        with tracker:
            trainer.train()
    return tracker.peak_bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="llama", choices=("llama", "qwen2", "phi3", "gpt2"))
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from lora_doctor.report import format_bytes

    with tempfile.TemporaryDirectory() as tmp:
        cfg = make_config(Path(tmp), args)
        engine, ours = engine_peak(cfg)
        theirs = trainer_peak(cfg, engine)
    ratio = ours / theirs
    out = {"arch": args.arch, "vocab": args.vocab, "batch": args.batch, "max_length": args.max_length,
           "grad_ckpt": args.grad_ckpt, "quant": cfg.quant.mode, "optim": cfg.train.optim,
           "engine_peak_tensor_bytes": ours, "trainer_peak_tensor_bytes": theirs, "ratio": ratio,
           "target_ratio": TARGET_RATIO, "met": ratio <= TARGET_RATIO}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"cpu, mid-size random {args.arch} (4 x 512, vocab {args.vocab}), {cfg.quant.mode} QLoRA all-linear, "
          f"batch {args.batch} x {args.max_length} tokens, grad_ckpt {'on' if args.grad_ckpt else 'off'}, one step; "
          "exact live-tensor peak")
    print(f"  lora-doctor engine   {format_bytes(ours):>12}")
    print(f"  peft + Trainer       {format_bytes(theirs):>12}")
    print(f"  ratio                {ratio:12.3f}x  (target <= {TARGET_RATIO}x at vocab >= 32k: "
          f"{'met' if out['met'] else 'NOT met'})")


if __name__ == "__main__":
    main()
