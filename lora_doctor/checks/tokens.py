"""Tokenizer vs training: pad token, EOS learning, padding side, vocabulary vs embedding rows."""

from __future__ import annotations

from ..data import IGNORE_INDEX
from .base import Finding, Severity
from .context import CheckContext
from .registry import register

EMBED_NAMES = {"gpt2": "wte", "falcon": "word_embeddings", "gpt_neox": "embed_in", "bloom": "word_embeddings",
               "opt": "embed_tokens", "phi": "embed_tokens"}
"""Input-embedding leaf names peft's modules_to_save must name, where they are not 'embed_tokens'."""
OUTPUT_NAMES = {"gpt_neox": "embed_out"}


def _tokenizer_known(ctx: CheckContext) -> bool:
    return ctx.vocab_len is not None or ctx.eos_token_id is not None


def _embed_names(ctx: CheckContext) -> tuple[str, str]:
    model_type = ctx.shape.model_type if ctx.shape else None
    emb = ctx.input_embedding_name or EMBED_NAMES.get(model_type, "embed_tokens")
    out = ctx.output_embedding_name or OUTPUT_NAMES.get(model_type, "lm_head")
    return emb, out


@register
def check_no_pad_token(ctx: CheckContext) -> list[Finding]:
    if not _tokenizer_known(ctx) or ctx.pad_token_id is not None:
        return []
    fix = ("Set a pad token distinct from EOS, e.g. tokenizer.pad_token = tokenizer.unk_token, or a reserved token "
           "(Llama-3: '<|finetune_right_pad_id|>'). Avoid pad = EOS with collators that mask by id (see pad-is-eos).")
    if ctx.padding_masked_by_position:
        return [Finding(
            Severity.INFO, "no-pad-token",
            "The tokenizer has no pad token; lora-doctor pads with EOS and masks padding by position, so training "
            "is unaffected, but batching with your own collator or tokenizer(..., padding=True) would fail.",
            fix,
        )]
    batched = (ctx.batch_size or 1) > 1
    return [Finding(
        Severity.ERROR if batched else Severity.WARNING, "no-pad-token",
        "The tokenizer has no pad token"
        + (f": padding a batch of {ctx.batch_size} fails with 'Asking to pad but the tokenizer does not have a "
           "padding token'." if batched else "; batch size 1 needs none, but any batching or collator padding fails."),
        fix,
    )]


@register
def check_eos_learning(ctx: CheckContext) -> list[Finding]:
    """Pad == EOS masks EOS out of the labels in collators that mask by token id; check the labels themselves."""
    if ctx.eos_token_id is None:
        return []
    pad_is_eos = ctx.pad_token_id is not None and ctx.pad_token_id == ctx.eos_token_id
    eos = f"'{ctx.eos_token}' (id {ctx.eos_token_id})" if ctx.eos_token else f"id {ctx.eos_token_id}"
    if ctx.chat is not None and ctx.chat.eot_token_id is not None and ctx.chat.eot_token_id != ctx.eos_token_id:
        # Chat data stops on the template's end-of-turn token, not EOS (Llama 3: <|eot_id|> vs <|end_of_text|>);
        # chat-eot-unsupervised and eos-mismatch own that, and data.add_eos does nothing for chat rows.
        return []
    if ctx.labels:
        if all(all(t == IGNORE_INDEX for t in seq) for seq in ctx.labels):
            return []  # nothing is labelled at all: all-labels-masked says so
        labelled = sum(1 for seq in ctx.labels if ctx.eos_token_id in seq)
        if labelled == 0:
            by_pad = pad_is_eos and not ctx.padding_masked_by_position
            cause = ("the pad token is EOS, so masking padding by token id also masks every EOS"
                     if by_pad else "the template does not append EOS, or it is truncated away")
            # Instruction data that never stops cannot give the answers the user wants (as no-eos-token judges
            # it), unless the user turned EOS off (data.add_eos: false); text data need not stop.
            lost = ctx.data_format != "text" and ctx.add_eos is not False
            return [Finding(
                Severity.ERROR if by_pad or lost else Severity.WARNING, "eos-never-learned",
                f"EOS {eos} is a label in none of the {len(ctx.labels)} tokenized examples ({cause}): the model "
                "never learns to stop and generates until max_new_tokens.",
                "Append tokenizer.eos_token to every response and mask padding by attention_mask (labels[attention_mask"
                " == 0] = -100), not by token id" + ("; better, use a pad token distinct from EOS." if by_pad else
                                                     " (lora-doctor: data.add_eos: true, a larger --max-length)."),
            )]
        if pad_is_eos:
            return [Finding(
                Severity.INFO, "pad-is-eos",
                f"Pad token is EOS {eos}, but EOS is still a label in {labelled}/{len(ctx.labels)} examples: "
                "padding is masked by position, so the model does learn to stop.",
                "Nothing to fix. A distinct pad token keeps it that way if the collator changes.",
            )]
        return []
    if pad_is_eos and ctx.padding_masked_by_position:
        return [Finding(
            Severity.INFO, "pad-is-eos",
            f"Pad token is EOS {eos}; lora-doctor masks padding by position, so EOS labels are kept here. A collator "
            "that masks by token id (DataCollatorForLanguageModeling) would drop every EOS label.",
            "Nothing to fix for lora-doctor runs; prefer a distinct pad token if you reuse this tokenizer elsewhere.",
        )]
    if pad_is_eos:
        return [Finding(
            Severity.WARNING, "pad-is-eos",
            f"Pad token is EOS {eos}: a collator that masks padding by token id (labels[input_ids == pad_id] = -100,"
            " as DataCollatorForLanguageModeling does) also masks every EOS, and the model never learns to stop.",
            "Use a distinct pad token (tokenizer.pad_token = tokenizer.unk_token), or mask by attention_mask and "
            "verify with: lora-doctor check CONFIG (it inspects the labels).",
        )]
    return []


@register
def check_left_padding(ctx: CheckContext) -> list[Finding]:
    if (ctx.padding_side or "").lower() != "left":
        return []
    return [Finding(
        Severity.WARNING, "left-padding",
        "padding_side='left' while training: it is meant for batched generation. In half precision it has "
        "caused overflow/NaN (TRL warns about it) and shifts position ids unless every path uses the attention mask.",
        "Train with tokenizer.padding_side = 'right' (padding_side: right in the config); switch to 'left' only "
        "for generation.",
    )]


def _rows_trained(ctx: CheckContext) -> set[int]:
    """Token ids lora.trainable_token_indices trains, in either of peft's forms (ids, or {module: ids})."""
    indices = ctx.trainable_token_indices
    if isinstance(indices, dict):
        return {i for ids in indices.values() for i in ids}
    return set(indices or ())


def _train_rows_hint(emb: str, out: str, ids: list[int] | None = None) -> str:
    """The two config keys that train embedding rows: the rows alone, or both full matrices."""
    shown = "[...the new ids...]" if ids is None else f"{list(ids)}"
    return (f"lora.trainable_token_indices: {shown} (peft's trainable_token_indices={shown}: trains and saves only "
            "those rows), or "
            f"lora.modules_to_save: {[emb, out]} (trains and saves the full matrices)")


@register
def check_vocab_vs_embeddings(ctx: CheckContext) -> list[Finding]:
    if ctx.vocab_len is None or ctx.shape is None:
        return []
    rows = ctx.shape.vocab_size
    new = ctx.vocab_len - rows
    if new <= 0:
        return []  # fewer tokens than rows is normal: vocabularies are padded to a multiple of 64/128
    emb, out = _embed_names(ctx)
    covered = set(ctx.modules_to_save or ()) >= {emb, out} or bool(ctx.trainable_token_indices)
    if not ctx.resize_embeddings:
        # Error only when the data may hold such an id (token-id-out-of-range then names it): when every
        # training id fits, the run learns; the extra tokens only fail later, wherever they are used.
        unused = ctx.input_id_max is not None and ctx.input_id_max < rows
        return [Finding(
            Severity.WARNING if unused else Severity.ERROR, "vocab-mismatch",
            f"The tokenizer has {ctx.vocab_len:,} tokens but the model's embedding has {rows:,} rows: the {new} "
            "token id(s) past the end crash the embedding lookup ('index out of range in self', or a CUDA "
            "device-side assert)" + (" wherever they are used; no training example holds one, so this run "
                                     "trains, but the tuned model cannot read or emit them." if unused else "."),
            "model.resize_token_embeddings(len(tokenizer)) before get_peft_model, and train the new rows: "
            + _train_rows_hint(emb, out, list(range(rows, ctx.vocab_len))[:8]),
        )]
    if covered:
        return []
    return [Finding(
        Severity.WARNING, "new-tokens-untrained",
        f"{new} token(s) added beyond the model's {rows:,} embedding rows get freshly initialised embeddings, but "
        "LoRA freezes embeddings: they are never trained, and not saved in the adapter either.",
        _train_rows_hint(emb, out, list(range(rows, ctx.vocab_len))[:8]),
    )]


@register
def check_untrained_label_tokens(ctx: CheckContext) -> list[Finding]:
    """Label tokens whose embeddings the base never trained (e.g. chat-template specials on a base model)."""
    bad = ctx.untrained_label_tokens
    if not bad:
        return []
    emb, out = _embed_names(ctx)
    trained = set(ctx.modules_to_save or ()) & {emb, out}
    covered = _rows_trained(ctx)
    todo = {i: r for i, r in bad.items() if i not in covered}
    if not todo or emb in trained:
        return []
    shown = ", ".join(f"id {i} ({r:.1e}x the median norm)" for i, r in list(todo.items())[:5])
    return [Finding(
        Severity.WARNING, "untrained-token-embeddings",
        f"{len(todo)} token(s) the model must learn to emit have near-zero input embeddings ({shown}): the base "
        "never trained them, and LoRA keeps embeddings frozen, so they stay untrained (and can give NaN or garbage).",
        f"Train those rows: {_train_rows_hint(emb, out, sorted(todo)[:8])}; or use a tokenizer whose EOS/template "
        "tokens the base was trained on.",
    )]


def _ids(ids: tuple[int, ...]) -> str:
    return str(ids[0]) if len(ids) == 1 else "[" + ", ".join(map(str, ids)) + "]"


@register
def check_no_eos_token(ctx: CheckContext) -> list[Finding]:
    """A tokenizer without EOS: data.add_eos appends nothing, so no example shows the model where to stop."""
    if ctx.vocab_len is None or ctx.eos_token_id is not None:
        return []
    instruction = ctx.data_format != "text"
    return [Finding(
        Severity.ERROR if instruction else Severity.WARNING, "no-eos-token",
        "The tokenizer has no EOS token (tokenizer.eos_token is None): data.add_eos appends nothing, so no "
        "example ends with a stop token and the tuned model generates until max_new_tokens.",
        "Give the tokenizer the EOS the model was trained with before training (tokenizer.eos_token = '</s>' or "
        "the model's end token, saved with tokenizer.save_pretrained into the model folder), then rerun "
        "lora-doctor check.",
    )]


@register
def check_eos_mismatch(ctx: CheckContext) -> list[Finding]:
    """The tokenizer's EOS (what the labels teach) vs the ids generate() stops on."""
    eos = ctx.eos_token_id
    if eos is None:
        return []
    gen, conf = ctx.generation_eos_token_ids, ctx.config_eos_token_ids
    stops = gen if gen else conf  # generate() reads generation_config, which defaults to config's
    if not stops:
        return []
    name = f"'{ctx.eos_token}' (id {eos})" if ctx.eos_token else f"id {eos}"
    if eos not in stops:
        key = "generation_config.eos_token_id" if gen else "config.eos_token_id"
        return [Finding(
            Severity.ERROR, "eos-mismatch",
            f"The tokenizer's EOS {name} is what the labels teach the model to emit, but generate() stops on "
            f"{key} = {_ids(stops)}: the tuned model emits its EOS and keeps going.",
            f"Align {key} (in the model folder's {'generation_config.json' if gen else 'config.json'}) to "
            f"include {eos}, or set the tokenizer's eos_token to the token with id {_ids(stops)}.",
        )]
    if conf and eos not in conf:
        return [Finding(
            Severity.WARNING, "eos-mismatch",
            f"The tokenizer's EOS {name} is in generation_config.eos_token_id {_ids(stops)} but not in "
            f"config.eos_token_id = {_ids(conf)}: generate() stops, but code reading model.config (pipelines, "
            "serving stacks) does not.",
            f"Align config.eos_token_id (config.json) to include {eos}.",
        )]
    return []


@register
def check_bos_twice(ctx: CheckContext) -> list[Finding]:
    """The template or text starts with a literal BOS and the tokenizer adds its own: ids show BOS twice."""
    n = ctx.n_double_bos
    if not n:
        return []
    total = f" of {ctx.n_examples}" if ctx.n_examples else ""
    return [Finding(
        Severity.WARNING, "bos-twice",
        f"{n}{total} examples start with BOS (id {ctx.bos_token_id}) twice: the prompt template or the text holds "
        "a literal BOS and the tokenizer adds one too, so training sees a prefix inference never does.",
        "Remove the literal BOS (e.g. '<s>', '<|begin_of_text|>') from data.prompt_template and from the text "
        "fields: the tokenizer adds it.",
    )]


@register
def check_token_ids_in_range(ctx: CheckContext) -> list[Finding]:
    """An input id at or past the embedding's rows: the lookup crashes mid-run (IndexError / device assert)."""
    if ctx.input_id_max is None or ctx.shape is None or ctx.input_id_max < ctx.shape.vocab_size:
        return []
    where = f" (in {ctx.input_id_max_origin})" if ctx.input_id_max_origin else ""
    emb, out = _embed_names(ctx)
    return [Finding(
        Severity.ERROR, "token-id-out-of-range",
        f"Token id {ctx.input_id_max}{where} is past the model's {ctx.shape.vocab_size:,} embedding rows: the "
        "first batch holding it crashes with 'index out of range in self' (CUDA: device-side assert).",
        "Use the tokenizer that ships with the model, or model.resize_token_embeddings(len(tokenizer)) and train "
        f"the new rows ({_train_rows_hint(emb, out)}).",
    )]


@register
def check_untrained_input_tokens(ctx: CheckContext) -> list[Finding]:
    """Tokens in the inputs whose embedding rows are zero or mean-initialised, with embeddings frozen."""
    bad = dict(ctx.untrained_input_tokens or {})
    if not bad or ctx.embeddings_trainable:
        return []
    emb, out = _embed_names(ctx)
    if emb in set(ctx.modules_to_save or ()):
        return []
    ids = sorted(set(bad) - _rows_trained(ctx))
    if not ids:
        return []
    return [Finding(
        Severity.WARNING, "untrained-input-embeddings",
        f"{len(ids)} token(s) in the training inputs have untrained embedding rows (zero, or the mean of all rows "
        f"as resize_token_embeddings initialises them): ids {ids[:8]}. Embeddings and {out} stay frozen under "
        "LoRA, so the model reads them as noise throughout training.",
        f"Train those rows: {_train_rows_hint(emb, out, ids[:8])}.",
    )]


@register
def check_trainable_token_indices_in_range(ctx: CheckContext) -> list[Finding]:
    """lora.trainable_token_indices naming a row the embedding does not have: peft's TrainableTokensLayer
    indexes the embedding with them at get_peft_model (IndexError), before any step."""
    if ctx.shape is None or not ctx.trainable_token_indices:
        return []
    rows = ctx.shape.vocab_size
    bad = sorted(i for i in _rows_trained(ctx) if not 0 <= i < rows)
    if not bad:
        return []
    return [Finding(
        Severity.ERROR, "trainable-token-index-out-of-range",
        f"lora.trainable_token_indices names {bad[:8]}, past the model's {rows:,} embedding rows (valid: 0.."
        f"{rows - 1}): peft fails with 'index out of bounds' while wrapping the model, before the first step.",
        "Give lora.trainable_token_indices ids the tokenizer and the embedding both have (tokenizer.convert_tokens_to_"
        "ids(...)); for tokens added past the embedding, resize the embeddings first.",
    )]
