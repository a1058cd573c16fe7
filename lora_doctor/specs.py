"""Frozen dataclasses for what the user asks for. Validation collects every problem, then raises once."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import raise_problems

OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "sgd")
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("bf16", "fp16", "fp32")
ADAPTER_DTYPES = ("fp32", "compute")
MAX_SEQ_LEN = 2**20
"""Longest sequence accepted (--seq-len, --max-length): 1,048,576 tokens, 8x the 131,072 of Llama-3.1, the
longest context among the shipped configs. Past it the numbers are typos, and sizes that overflow torch and
the tokenizers (issue 12)."""
MAX_BATCH = 2**16
"""Largest micro-batch or accumulation accepted (--batch, --grad-accum): 65,536 sequences per step."""
MAX_EPOCHS = 10**5
"""Most passes over the data accepted (--epochs): fine-tunes run a few (transformers' TrainingArguments
num_train_epochs defaults to 3, Stanford Alpaca trained 3); 100,000 still lets a handful of rows be overfit on
purpose. Past it the number is a typo: 1e300 epochs schedules more optimizer steps than any run can take."""


@dataclass(frozen=True)
class LoraSpec:
    """The adapter: what peft's LoraConfig gets."""

    r: int = 16
    """LoRA rank (--r)."""
    alpha: int | None = None
    """lora_alpha; None means 2*r, the common default."""
    dropout: float = 0.05
    """lora_dropout."""
    targets: str | tuple[str, ...] = "all-linear"
    """A preset ('qv', 'attn', 'mlp', 'all-linear') or explicit leaf names (--target)."""
    use_dora: bool = False
    """Weight-decomposed LoRA (--dora): one extra magnitude vector per targeted module."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r)."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained in full and saved with the adapter (peft's modules_to_save), e.g. [embed_tokens, lm_head]."""
    trainable_token_indices: tuple[int, ...] | dict[str, tuple[int, ...]] | None = None
    """Embedding rows trained and saved with the adapter (peft's trainable_token_indices): token ids, or {module: [ids]}."""
    adapter_dtype: str = "fp32"
    """Dtype of every trainable parameter (LoRA A/B, modules_to_save copies): 'fp32' (peft's
    autocast_adapter_dtype; AdamW updates survive) or 'compute' (quant.compute_dtype / train.precision)."""

    def __post_init__(self):
        problems = []
        if not isinstance(self.r, int) or self.r <= 0:
            problems.append((f"--r must be a positive integer, got {self.r!r}.", "Try: --r 16"))
        if self.alpha is not None and self.alpha <= 0:
            problems.append((f"--alpha must be positive, got {self.alpha!r}.", "Try: --alpha 32 (2*r)"))
        if not 0.0 <= self.dropout < 1.0:
            problems.append((f"--dropout must be in [0, 1), got {self.dropout!r}.", "Try: --dropout 0.05"))
        names = self.targets.split(",") if isinstance(self.targets, str) else self.targets
        if not any(isinstance(t, str) and t.strip() for t in names):
            # Before peft: it would refuse with "No `target_modules` passed", naming no flag or preset.
            problems.append((f"No target modules given: --target is {self.targets!r}.",
                             "Presets: qv, attn, mlp, all-linear. Try: --target all-linear"))
        if self.adapter_dtype not in ADAPTER_DTYPES:
            problems.append((f"lora.adapter_dtype must be one of {', '.join(ADAPTER_DTYPES)}; got {self.adapter_dtype!r}.",
                             "Try: lora.adapter_dtype: fp32"))
        problems += _saved_problems(self.modules_to_save, self.trainable_token_indices)
        raise_problems(problems)

    @property
    def lora_alpha(self) -> int:
        return self.alpha if self.alpha is not None else 2 * self.r


def _saved_problems(modules, indices) -> list[tuple[str, str]]:
    """Problems in lora.modules_to_save / lora.trainable_token_indices (names non-empty, ids non-negative)."""
    problems = []
    if not all(isinstance(m, str) and m for m in modules):
        problems.append((f"lora.modules_to_save must list module names; got {list(modules)!r}.",
                         "Try: lora.modules_to_save: [embed_tokens, lm_head]"))
    groups = indices.values() if isinstance(indices, dict) else [indices or ()]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for ids in groups for i in ids):
        problems.append((f"lora.trainable_token_indices must be token ids >= 0 (or {{module: [ids]}}); got {indices!r}.",
                         "Try: lora.trainable_token_indices: [32000, 32001]"))
    return problems


@dataclass(frozen=True)
class QuantSpec:
    """How the frozen base is stored. mode None means a plain 16-bit base (LoRA, not QLoRA)."""

    mode: str | None = "nf4"
    """'nf4', 'fp4', or None ('none' in a flag or file) for a plain 16-bit base: LoRA, not QLoRA."""
    double_quant: bool = True
    """Quantize the absmax constants too (QLoRA paper sec. 3, 'Double Quantization')."""
    compute_dtype: str = "bf16"
    """Dtype the 4-bit weights are dequantized to for matmuls."""
    blocksize: int = 64
    """bitsandbytes 4-bit blocksize (Params4bit default)."""
    upcast_frozen: bool = False
    """QLoRA only: cast the frozen non-4-bit weights (embeddings, lm_head, norms, biases) to fp32, as peft's
    prepare_model_for_kbit_training does (the --stack hf path). False keeps them in compute_dtype."""

    def __post_init__(self):
        problems = []
        if self.mode is not None and self.mode not in QUANT_TYPES:
            problems.append((f"Unknown quantization {self.mode!r}.", f"Choose one of {', '.join(QUANT_TYPES)} or none."))
        if self.compute_dtype not in COMPUTE_DTYPES:
            problems.append((f"Unknown compute dtype {self.compute_dtype!r}.", f"Choose one of {', '.join(COMPUTE_DTYPES)}."))
        raise_problems(problems)


LOSS_CHUNKS = 8
"""Sequence chunks of the chunked loss: torchtune's CEWithChunkedOutputLoss(num_output_chunks=8)
(torchtune/modules/loss/ce_chunked_output_loss.py), the engine's default."""


@dataclass(frozen=True)
class Levers:
    """What the training stack does with memory beyond the step's shape. The defaults are the plain HF path
    (Trainer / TRL / Axolotl on peft); stack.STACKS names that one 'hf' and the engine's defaults 'lora-doctor'."""

    chunked_loss: bool = False
    """lm_head + loss over sequence chunks, each under torch.utils.checkpoint: no full (B, T, V) fp32 logits."""
    loss_chunks: int = LOSS_CHUNKS
    """Sequence chunks of the chunked loss (train.loss_chunks)."""
    upcast_frozen: bool = True
    """QLoRA: prepare_model_for_kbit_training casts every non-4-bit parameter (embeddings, norms, lm_head) to
    fp32, which makes the residual stream fp32 too. False keeps them, and the stream, in the compute dtype."""
    offload_activations: bool = False
    """Saved activations (the checkpointed layer inputs) move to host memory; the device keeps about two layers'."""
    packing: bool = False
    """Examples packed into rows of seq_len tokens: the same B x T tensors per step, so no change in bytes here."""

    def __post_init__(self):
        if not isinstance(self.loss_chunks, int) or isinstance(self.loss_chunks, bool) or self.loss_chunks <= 0:
            raise_problems([(f"The loss chunk count must be a positive integer, got {self.loss_chunks!r}.",
                             f"Try: {LOSS_CHUNKS} (torchtune's CEWithChunkedOutputLoss default)")])


@dataclass(frozen=True)
class TrainSpec:
    """The shape of one optimizer step, as far as memory is concerned."""

    seq_len: int = 2048
    """Tokens per sequence (--seq-len)."""
    batch: int = 1
    """Micro-batch size per device (--batch)."""
    grad_ckpt: bool = True
    """Gradient checkpointing (--grad-ckpt/--no-grad-ckpt)."""
    optim: str = "paged-adamw-8bit"
    """Optimizer (--optim): adamw, adamw-8bit, paged-adamw-8bit, sgd."""
    attn_impl: str = "sdpa"
    """Attention implementation: 'sdpa'/'flash_attention_2' keep no (T, T) matrix; 'eager' does."""
    dtype: str = "bf16"
    """Activation / compute dtype."""
    levers: Levers = Levers()
    """What the stack does with memory (chunked loss, fp32 upcast, offload); the default is the HF path."""
    device: str = "cuda"
    """Device type the step runs on, 'cuda' or 'cpu': dropout saves a bool mask on CUDA and one in its input's dtype
    on CPU, where sdpa with attention dropout also falls back to the math path (dropout.py)."""

    def __post_init__(self):
        problems = []
        if not isinstance(self.seq_len, int) or self.seq_len <= 0:
            problems.append((f"--seq-len must be a positive integer, got {self.seq_len!r}.", "Try: --seq-len 2048"))
        elif self.seq_len > MAX_SEQ_LEN:
            problems.append((f"--seq-len must be at most {MAX_SEQ_LEN:,} tokens, got {self.seq_len!r}.", "Try: --seq-len 2048"))
        if not isinstance(self.batch, int) or self.batch <= 0:
            problems.append((f"--batch must be a positive integer, got {self.batch!r}.", "Try: --batch 1"))
        elif self.batch > MAX_BATCH:
            problems.append((f"--batch must be at most {MAX_BATCH:,} sequences, got {self.batch!r}.",
                             "Try: --batch 8, and --grad-accum for a larger effective batch"))
        if self.optim not in OPTIMIZERS:
            problems.append((f"Unknown optimizer {self.optim!r}.", f"Choose one of {', '.join(OPTIMIZERS)}."))
        if self.attn_impl not in ("sdpa", "eager", "flash_attention_2"):
            problems.append((f"Unknown attention implementation {self.attn_impl!r}.", "Choose sdpa, eager or flash_attention_2."))
        if self.dtype not in COMPUTE_DTYPES:
            problems.append((f"Unknown dtype {self.dtype!r}.", f"Choose one of {', '.join(COMPUTE_DTYPES)}."))
        if self.device not in ("cuda", "cpu"):
            problems.append((f"Unknown device type {self.device!r}.", "Choose cuda or cpu."))
        raise_problems(problems)
