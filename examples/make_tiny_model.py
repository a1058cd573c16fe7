"""Write tiny random-weight models + tokenizers next to this file, offline, for the example configs.

    python examples/make_tiny_model.py            # examples/tiny-llama, tiny-gpt2 and tiny-llama-chat
    python examples/make_tiny_model.py --arch mistral --out /tmp/tiny-mistral

The weights are random (seeded) and the tokenizer is a byte-level BPE trained on a few sentences
(lora_doctor.tiny): nothing is downloaded. Good for trying probe/train on a laptop in seconds.
tiny-llama-chat (for examples/chat.yaml) is the tiny Llama as an "instruct" model: its tokenizer has
ChatML's <|im_start|>/<|im_end|> as special tokens (inside the embedding) and a ChatML template with
{% generation %} tags, and <|im_end|> is its EOS, as in Qwen2.5-Instruct.
"""

import argparse
from pathlib import Path

from lora_doctor.chat.templates import CHATML_TAGGED
from lora_doctor.tiny import TINY_CONFIGS, build_tiny_model, save_tiny_model, tiny_tokenizer

HERE = Path(__file__).resolve().parent


def save_tiny_chat_model(path: Path, seed: int = 0) -> Path:
    """The tiny Llama with a chat tokenizer; the embedding is sized after the special tokens are added."""
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHATML_TAGGED
    model = build_tiny_model("llama", vocab_size=len(tok), seed=seed)
    model.config.update(dict(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                             pad_token_id=tok.pad_token_id))
    # As instruct checkpoints ship it: generate() stops on the end-of-turn token the labels teach.
    model.generation_config.update(eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


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
    if not args.arch:
        print(f"wrote {save_tiny_chat_model(HERE / 'tiny-llama-chat', seed=args.seed)}")


if __name__ == "__main__":
    main()
