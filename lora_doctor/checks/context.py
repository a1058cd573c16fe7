"""CheckContext: every fact a check may read, as plain optional fields.

A check reads only these fields and returns [] when the ones it needs are None, so a test builds a
context by hand with just the facts it plants. `checks/build.py` fills it from the real objects
(RunConfig, ModelShape, tokenizer, DataStats, plan Headroom/Verdict, RunResult, a live or meta model)
by their real fields, so a renamed field fails loudly in a test.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from ..shape import ModelShape

if TYPE_CHECKING:
    from ..chat import ChatStats


@dataclass
class CheckContext:
    # --- what the user asked for (RunConfig) ---------------------------------------------------
    model_id: str | None = None
    targets: str | tuple[str, ...] | None = None
    """As typed: a preset ('qv', 'attn', 'mlp', 'all-linear') or explicit leaf names."""
    lora_r: int | None = None
    lora_alpha: float | None = None
    use_rslora: bool | None = None
    lora_dropout: float | None = None
    use_dora: bool | None = None
    modules_to_save: tuple[str, ...] | None = None
    trainable_token_indices: Any = None
    lr: float | None = None
    optim: str | None = None
    """'adamw', 'adamw-8bit', 'paged-adamw-8bit' or 'sgd'."""
    precision: str | None = None
    """Mixed-precision mode of the run: 'bf16', 'fp16' or 'fp32'."""
    quant_mode: str | None = None
    """'nf4', 'fp4', '8bit' or None (plain 16-bit LoRA base)."""
    compute_dtype: str | None = None
    """bitsandbytes 4-bit compute dtype: 'bf16', 'fp16', 'fp32'."""
    merge: bool | None = None
    merge_reloads_16bit: bool | None = None
    """True when the merge reloads the base unquantized instead of merging into the 4-bit weights."""
    gradient_checkpointing: bool | None = None
    use_reentrant: bool | None = None
    input_require_grads: bool | None = None
    """Whether the input embeddings' output requires grad (enable_input_require_grads / kbit prep)."""
    embeddings_trainable: bool | None = None
    batch_size: int | None = None
    max_length: int | None = None
    padding_side: str | None = None
    device_map: Any = None
    """What from_pretrained gets; lora-doctor's engine loads one copy per process ({'': local_rank})."""
    padding_masked_by_position: bool | None = None
    """True when padding labels are -100 by position (lora-doctor's collate) rather than by token id,
    so a missing pad token falls back to EOS safely and pad == EOS cannot mask real EOS labels."""
    resize_embeddings: bool | None = None
    """True when the run resizes the embeddings to len(tokenizer) before training."""

    # --- the model -----------------------------------------------------------------------------
    shape: ModelShape | None = None
    model_dtype: str | None = None
    """The dtype the checkpoint was trained/saved in (config.dtype / torch_dtype), normalized: 'bf16', 'fp16', 'fp32'."""
    trainable_params: int | None = None
    resolved_targets: tuple[str, ...] | None = None
    """Leaf names peft actually wraps with LoRA."""
    trainable_dtypes: tuple[str, ...] | None = None
    """Distinct dtypes of parameters with requires_grad, e.g. ('torch.float32',)."""
    untrained_label_tokens: dict[int, float] | None = None
    """Token ids that appear as labels but whose input-embedding row norm is a tiny fraction of the
    median row's (read off real weights): the base model never trained them."""
    input_embedding_name: str | None = None
    output_embedding_name: str | None = None
    """Attribute name of the output embedding (get_output_embeddings), e.g. 'lm_head'."""

    # --- tokenizer and data --------------------------------------------------------------------
    vocab_len: int | None = None
    """len(tokenizer): base vocabulary plus added tokens."""
    pad_token: str | None = None
    pad_token_id: int | None = None
    eos_token: str | None = None
    eos_token_id: int | None = None
    n_examples: int | None = None
    n_packed_rows: int | None = None
    """Packed rows the engine batches (DataStats.n_rows) with data.packing; None: one row per example."""
    n_truncated: int | None = None
    """Examples cut by max_length (response partly kept)."""
    n_response_lost: int | None = None
    """Examples whose every label is -100 after truncation/templating: they teach nothing."""
    empty_fields: dict[str, int] | None = None
    formats: dict[str, int] | None = None
    """Examples per detected prompt format, e.g. {'alpaca': 980, 'plain': 20}."""
    longest_tokens: int | None = None
    """Longest example before truncation, EOS included."""
    labels: list[list[int]] | None = None
    """Label ids of (a sample of) the tokenized examples, -100 where masked."""
    chat: "ChatStats | None" = None
    """What tokenizing chat rows with the chat template found (lora_doctor.chat.ChatStats); for other
    formats, or a chat read that failed, only the rows' shapes (row_shape_stats)."""

    # --- the plan ------------------------------------------------------------------------------
    fit_verdict: str | None = None
    """'fits', 'tight' or 'does-not-fit' for the chosen GPU."""
    gpu_name: str | None = None
    gpu_bytes: int | None = None
    required_bytes: int | None = None
    largest_batch: int | None = None
    largest_seq_len: int | None = None

    # --- the environment -----------------------------------------------------------------------
    cuda_available: bool | None = None
    cuda_capability: tuple[int, int] | None = None
    bf16_supported: bool | None = None
    bnb_installed: bool | None = None
    bnb_error: str | None = None
    """Why bitsandbytes' native library failed to load, None when it loaded (or is not needed)."""
    world_size: int | None = None
    local_rank: int | None = None
    strategy: str | None = None
    """'ddp' or 'fsdp': train.distributed resolved against the launch's environment (fsdp.resolve_strategy)."""
    fsdp_blockers: tuple[tuple[str, str | None], ...] | None = None
    """What the engine refuses to shard, as (message, hint) in its own words (fsdp.fsdp_problems); () when
    nothing is refused. Filled only when strategy is 'fsdp'."""

    # --- the probe -----------------------------------------------------------------------------
    loss_trace: list[float] | None = None
    label_tokens_trace: list[int] | None = None
    """Per probed step: tokens with a label (not -100), all micro-batches; all 0 means the probe scored nothing."""
    grad_norms: dict[str, float] | None = None
    """Per adapter module: largest gradient norm seen after step 0 (lora_A is exactly 0 at step 0)."""
    weight_deltas: dict[str, float] | None = None
    """Per adapter module: norm of (weights after the probe - weights before)."""
    base_params_with_grad: int | None = None

    # --- issue 11: EOS/BOS, length, data quality, eval set, schedule ---------------------------
    data_format: str | None = None
    """data.format: 'instruction' (prompt masked) or 'text' (every token trained)."""
    add_eos: bool | None = None
    response_field: str | None = None
    bos_token_id: int | None = None
    config_eos_token_ids: tuple[int, ...] | None = None
    """config.eos_token_id of the checkpoint (an int or a list), as a tuple."""
    generation_eos_token_ids: tuple[int, ...] | None = None
    """generation_config.json's eos_token_id, which generate() stops on; None when there is no such file."""
    max_positions: int | None = None
    """The model's context: config.max_position_embeddings (or n_positions)."""
    input_id_max: int | None = None
    """Largest token id in any training example's input ids."""
    input_id_max_origin: str | None = None
    """'file:line' of the example holding input_id_max."""
    n_double_bos: int | None = None
    """Examples that start with BOS and hold BOS again in the prompt (template BOS + tokenizer BOS)."""
    n_beyond_context: int | None = None
    """Examples longer than max_positions after truncation to max_length."""
    n_prompt_fills: int | None = None
    """Examples whose prompt alone fills max_length: truncation leaves no response token."""
    n_rows: int | None = None
    n_duplicate_rows: int | None = None
    """Rows identical (template fields, stripped) to an earlier row."""
    n_echo_responses: int | None = None
    """Rows whose response repeats the instruction or input."""
    template_markers: dict[str, int] | None = None
    """Rows per prompt-template family whose markers appear in the text fields (datafacts.TEMPLATE_MARKERS)."""
    prompt_family: str | None = None
    """The family of the template lora-doctor wraps instruction rows in ('alpaca' by default)."""
    eval_path: str | None = None
    eval_path_exists: bool | None = None
    n_eval_rows: int | None = None
    n_eval_examples: int | None = None
    n_eval_overlap: int | None = None
    """Eval examples whose token ids equal a training example's."""
    eval_fraction: float | None = None
    grad_accum: int | None = None
    warmup_steps: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    eval_every: int | None = None
    untrained_input_tokens: dict[int, float] | None = None
    """Token ids in the inputs whose embedding row is ~0 or the mean of all rows (resize_token_embeddings'
    mean init), as (distance / median row norm): never trained."""

    def replace(self, **changes) -> "CheckContext":
        """A copy with some fields changed (tests plant one fault into a healthy context)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise TypeError(f"CheckContext has no field(s) {sorted(unknown)}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return CheckContext(**values)
