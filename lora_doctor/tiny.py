"""Tiny random-weight causal LMs and an offline-trained tokenizer, for tests, examples and benchmarks.

Nothing here downloads anything: configs are built in code, the tokenizer is a byte-level BPE
trained on a few sentences by the `tokenizers` library.
"""

from __future__ import annotations

from pathlib import Path

# One small config per architecture family the tests cover. Sizes are the smallest that keep
# every code path (GQA, fused qkv, Conv1D, MoE routing) and stay divisible by the 4-bit blocksize.
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=128,
                    tie_word_embeddings=False),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                 original_max_position_embeddings=256, pad_token_id=None, tie_word_embeddings=False),
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False, alibi=False),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
}

CORPUS = [
    "### Instruction:\nAdd two and three.\n\n### Response:\nFive.",
    "### Instruction:\nName a primary colour.\n\n### Response:\nRed.",
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters train a small number of parameters on top of a frozen base model.",
    "Quantized weights are stored in four bits with one absmax constant per block of sixty-four.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;!?'\"()-_#\n",
]


def tiny_config(arch: str = "llama", vocab_size: int = 512, **overrides):
    """A transformers config for a tiny model of the given family."""
    from transformers import AutoConfig

    kwargs = dict(TINY_CONFIGS[arch])
    model_type = kwargs.pop("model_type")
    kwargs["vocab_size"] = vocab_size
    # Token ids of tiny_tokenizer(): <unk>=0, <s>=1, </s>=2, <pad>=3.
    kwargs.update(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_tokenizer(vocab_size: int = 512, pad: str | None = "<pad>", padding_side: str = "right"):
    """A byte-level BPE tokenizer trained offline; `pad=None` leaves it without a pad token, `pad='eos'` reuses EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    kwargs = dict(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", padding_side=padding_side)
    if pad == "eos":
        kwargs["pad_token"] = "</s>"
    elif pad is not None:
        kwargs["pad_token"] = pad
    return PreTrainedTokenizerFast(**kwargs)


def build_tiny_model(arch: str = "llama", vocab_size: int = 512, seed: int = 0, dtype=None, **overrides):
    """A random-weight model on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size=vocab_size, **overrides)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype or torch.float32)


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, pad: str | None = "<pad>", **overrides) -> Path:
    """Write a tiny model and its tokenizer to `path`, loadable with from_pretrained (what `probe` loads)."""
    path = Path(path)
    tok = tiny_tokenizer(pad=pad)
    model = build_tiny_model(arch, vocab_size=len(tok), seed=seed, **overrides)
    model.config.eos_token_id = tok.eos_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# Mid-size random models for measured-vs-planned memory (tests/test_tensorpeak.py, bench/bench_memory.py): big
# enough that the logits and activations dominate as on a real model (vocab 32k, 4 x 512), small enough for a CPU
# step in seconds. The tokenizer stays tiny_tokenizer's 512 ids; the 32k-row embedding and lm_head are what count.
MID_CONFIGS: dict[str, dict] = {
    "llama": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048),
    "qwen2": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, max_position_embeddings=2048),
    "phi3": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=2048, original_max_position_embeddings=2048),
    "gpt2": dict(n_embd=512, n_layer=4, n_head=8, n_positions=2048),
}


def save_mid_model(path: str | Path, arch: str = "llama", vocab_size: int = 32000, seed: int = 0, **overrides) -> Path:
    """Write a MID_CONFIGS model (random weights, `vocab_size` rows) with tiny_tokenizer, loadable by `probe`."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = build_tiny_model(arch, vocab_size=vocab_size, seed=seed, **{**MID_CONFIGS[arch], **overrides})
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_long_text_data(path: str | Path, n_examples: int = 8, n_chars: int = 12000) -> Path:
    """A 'text' format .jsonl whose rows each run past `n_chars` characters (~4k tiny-tokenizer tokens), so every
    row of a batch is truncated to data.max_length and the step has exactly batch x max_length tokens."""
    import json

    path = Path(path)
    body = " ".join(CORPUS)
    with path.open("w") as f:
        for i in range(n_examples):
            text = f"{i} " + (body * (n_chars // len(body) + 1))[:n_chars]
            f.write(json.dumps({"text": text}) + "\n")
    return path


def write_exact_text_data(path: str | Path, n_examples: int, n_tokens: int, tokenizer=None) -> Path:
    """A 'text' format .jsonl whose examples each tokenize to exactly `n_tokens` (EOS included) with `tokenizer`
    (the one the model directory loads; tiny_tokenizer() by default), so packing (data.packing) with max_length a
    multiple of n_tokens fills every row to max_length."""
    import json

    tok = tokenizer or tiny_tokenizer()

    def length(text: str) -> int:
        return len(tok(text, add_special_tokens=True)["input_ids"]) + 1  # + EOS, as data.py appends it

    path = Path(path)
    with path.open("w") as f:
        for i in range(n_examples):
            text = str(i)
            for w in " ".join(CORPUS).split():  # corpus words while they fit, then single letters to the length
                if length(f"{text} {w}") > n_tokens - 4:
                    break
                text = f"{text} {w}"
            while length(text) < n_tokens:
                text += " a"
            if length(text) != n_tokens:
                raise ValueError(f"example {i} tokenizes to {length(text)}, not {n_tokens}")
            f.write(json.dumps({"text": text}) + "\n")
    return path
