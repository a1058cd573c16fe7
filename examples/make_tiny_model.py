"""Write tiny random-weight models + tokenizers next to this file, offline, for the example configs.

    python examples/make_tiny_model.py            # examples/tiny-llama and examples/tiny-gpt2
    python examples/make_tiny_model.py --arch mistral --out /tmp/tiny-mistral

The weights are random (seeded) and the tokenizer is a byte-level BPE trained on a few sentences
(lora_doctor.tiny): nothing is downloaded. Good for trying probe/train on a laptop in seconds.
"""

import argparse
from pathlib import Path

from lora_doctor.tiny import TINY_CONFIGS, save_tiny_model

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", choices=sorted(TINY_CONFIGS), action="append",
                    help="Architecture(s) to write (default: llama and gpt2).")
    ap.add_argument("--out", type=Path, help="Output folder (only with a single --arch).")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    archs = args.arch or ["llama", "gpt2"]
    if args.out and len(archs) > 1:
        ap.error("--out needs exactly one --arch")
    for arch in archs:
        out = args.out or HERE / f"tiny-{arch}"
        save_tiny_model(out, arch, seed=args.seed)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
