"""Chat data with real tokenizers: rows, rendering, assistant-only labels, truncation, ChatStats."""

import copy
from pathlib import Path

import pytest

from chat_fixtures import (CHATML, CHATML_TAGGED, CHATML_TAGGED_EOT_OUTSIDE, CHATML_THINK, CONVERSATION,
                           LLAMA3_EMBEDDING_ROWS, TEMPLATE_PAIRS, TOKENIZERS, chatml_tokenizer, llama3_tokenizer, rows)
from lora_doctor.chat import (IGNORE_INDEX, ChatStyle, MaskMethod, RowShape, compare_masks, detect_chat_style,
                              normalize_messages, render_conversation, roles_alternate, row_shape, tokenize_chat_rows,
                              tokenize_conversation)
from lora_doctor.errors import LoraDoctorError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"


def _read(path: Path) -> list[tuple[str, dict]]:
    import json

    return [(f"{path.name}:{i}", json.loads(line)) for i, line in enumerate(path.read_text().splitlines(), start=1)]


@pytest.mark.parametrize("convention", sorted(TEMPLATE_PAIRS))
def test_derived_mask_equals_generation_tags_token_for_token(convention):
    plain, tagged = TEMPLATE_PAIRS[convention]
    tok = TOKENIZERS[convention](template=tagged)
    r = render_conversation(CONVERSATION, tok, tagged)
    cmp = compare_masks(r)
    assert cmp.n_tokens_disagreeing == 0 and cmp.first_disagreement is None
    assert sum(cmp.tagged) > 0
    with_tags = tokenize_conversation(CONVERSATION, tok)
    without = tokenize_conversation(CONVERSATION, TOKENIZERS[convention](template=plain))
    assert (with_tags.method, without.method) == (MaskMethod.GENERATION_TAGS, MaskMethod.PREFIX_DIFF)
    assert with_tags.input_ids == without.input_ids and with_tags.labels == without.labels
    assert with_tags.mask_disagreement == 0 and without.mask_disagreement is None


@pytest.mark.parametrize("convention,eot", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("mistral", "</s>")])
def test_every_assistant_turn_supervised_with_its_end_of_turn_token(convention, eot):
    tok = TOKENIZERS[convention]()
    ex = tokenize_conversation(CONVERSATION, tok)
    supervised = [text for text, sup in ex.segments if sup]
    assert len(supervised) == 2
    assert all(s.rstrip().endswith(eot) for s in supervised)
    assert "4." in supervised[0] and "6, since 3+3 is 6." in supervised[1]
    assert tok.convert_ids_to_tokens(ex.eot_token_id) == eot
    assert ex.n_turns_eot_unsupervised == 0 and ex.n_prompt_labels == 0
    assert "".join(text for text, _ in ex.segments) == render_conversation(CONVERSATION, tok, tok.chat_template).text


def test_llama3_labels_pinned():
    tok = llama3_tokenizer()
    ex = tokenize_conversation(CONVERSATION, tok)
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    # '4.' + <|eot_id|>, then '6, since 3+3 is 6.' + <|eot_id|>: Meta's tiktoken ids.
    assert tok.decode(labelled) == "4.<|eot_id|>6, since 3+3 is 6.<|eot_id|>"
    assert labelled.count(128009) == 2
    assert ex.input_ids[0] == 128000 and ex.input_ids.count(128000) == 1
    assert ex.role_tokens == {"system": 10, "user": 23, "assistant": 23}


def test_last_assistant_only():
    ex = tokenize_conversation(CONVERSATION, chatml_tokenizer(), train_on="last_assistant")
    assert [text for text, sup in ex.segments if sup] == ["6, since 3+3 is 6.<|im_end|>\n"]


def test_truncation_in_the_middle_of_a_turn_is_recorded():
    tok = llama3_tokenizer()
    full = tokenize_conversation(CONVERSATION, tok)
    last_start = max(i for i, t in enumerate(full.labels) if t != IGNORE_INDEX and full.labels[i - 1] == IGNORE_INDEX)
    cut = tokenize_conversation(CONVERSATION, tok, max_length=last_start + 2)
    assert len(cut.input_ids) == last_start + 2 and cut.n_tokens_full == len(full.input_ids)
    assert cut.assistant_tokens_lost == full.n_label_tokens - cut.n_label_tokens > 0
    assert cut.eot_lost == 1 and not cut.all_assistant_lost
    first_start = full.labels.index(next(t for t in full.labels if t != IGNORE_INDEX))
    gone = tokenize_conversation(CONVERSATION, tok, max_length=first_start)
    assert gone.all_assistant_lost and gone.eot_lost == 2 and gone.n_label_tokens == 0


def test_eot_outside_generation_tags_is_counted():
    ex = tokenize_conversation(CONVERSATION, chatml_tokenizer(CHATML_TAGGED_EOT_OUTSIDE))
    assert ex.n_turns_eot_unsupervised == 2
    assert ex.mask_disagreement > 0  # the derived spans include <|im_end|>, the tags do not


def test_user_template_inline_and_file(tmp_path):
    tok = chatml_tokenizer(template=None)
    inline = tokenize_conversation(CONVERSATION, tok, chat_template=CHATML)
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML_TAGGED)
    from_file = tokenize_conversation(CONVERSATION, tok, chat_template=str(path))
    assert inline.labels == from_file.labels and from_file.method is MaskMethod.GENERATION_TAGS
    with pytest.raises(LoraDoctorError, match="data.chat_template 'nope.jinja' is neither"):
        tokenize_conversation(CONVERSATION, tok, chat_template="nope.jinja")


def test_no_template_names_the_key_and_the_instruct_model():
    with pytest.raises(LoraDoctorError) as e:
        tokenize_chat_rows(rows(CONVERSATION), llama3_tokenizer(template=None), model_id="meta-llama/Llama-3.2-1B")
    assert "no chat template" in e.value.message
    assert "data.chat_template" in e.value.hint and "meta-llama/Llama-3.2-1B-Instruct" in e.value.hint


def test_example_dataset_stats():
    pairs, s = tokenize_chat_rows(_read(EXAMPLES / "chat.jsonl"), chatml_tokenizer(CHATML_TAGGED),
                                  embedding_rows=LLAMA3_EMBEDDING_ROWS + 2)
    assert len(pairs) == s.n_examples == 30 and s.style == "openai"
    assert s.mask_method is MaskMethod.GENERATION_TAGS and s.mask_disagreements == 0
    assert s.n_label_tokens == sum(sum(1 for t in lab if t != IGNORE_INDEX) for _, lab in pairs)
    assert set(s.role_tokens) == {"system", "user", "assistant"}
    assert s.eot_token == "<|im_end|>" and s.pad_is_eot is False and s.has_template is True
    assert s.n_turns_eot_unsupervised == s.n_truncated_assistant == s.n_prompt_label_tokens == 0
    assert s.missing_special_tokens == () and s.special_tokens_outside_embedding == ()
    assert s.example_marked.count("[[") == 3 and "[[Six.<|im_end|>\n]]" in s.example_marked


def test_sharegpt_rows_render_like_openai_rows():
    sg = _read(EXAMPLES / "chat-sharegpt.jsonl")
    assert detect_chat_style(sg) is ChatStyle.SHAREGPT
    msgs = normalize_messages(sg[0][1], sg[0][0], ChatStyle.SHAREGPT)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    tok = llama3_tokenizer()
    pairs, s = tokenize_chat_rows(sg, tok)
    assert s.style == "sharegpt" and s.n_examples == 6
    assert pairs[0] == (lambda ex: (ex.input_ids, ex.labels))(tokenize_conversation(msgs, tok))


def test_stats_count_planted_faults():
    tok = copy.deepcopy(chatml_tokenizer(CHATML_THINK))
    tok.pad_token = "<|im_end|>"
    data = rows(CONVERSATION,
                [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"},
                 {"role": "assistant", "content": ""}],
                [{"role": "system", "content": "s"}, {"role": "user", "content": "no answer"}])
    pairs, s = tokenize_chat_rows(data, tok, embedding_rows=LLAMA3_EMBEDDING_ROWS)
    assert s.n_examples == len(pairs) == 2
    assert (s.n_non_alternating, s.rows_non_alternating) == (1, ("chat.jsonl:2",))
    assert (s.n_no_assistant, s.rows_no_assistant) == (1, ("chat.jsonl:3",))
    assert s.n_empty_assistant == 1 and s.n_assistant_turns == 3 and s.n_empty_think == 3
    assert s.pad_is_eot is True
    assert s.special_tokens_outside_embedding == ("<|im_end|>", "<|im_start|>")
    assert s.template_and_tokenizer_add_bos is False and s.n_bos_twice == 0


def test_llama3_template_and_tokenizer_both_add_bos():
    _, s = tokenize_chat_rows(rows(CONVERSATION), llama3_tokenizer())
    assert s.template_and_tokenizer_add_bos is True and s.n_bos_twice == 0
    _, twice = tokenize_chat_rows(rows(CONVERSATION), llama3_tokenizer("{{ bos_token }}" + TEMPLATE_PAIRS["llama3"][0]))
    assert twice.n_bos_twice == 1


def test_missing_template_tokens():
    _, s = tokenize_chat_rows(rows(CONVERSATION), llama3_tokenizer(CHATML))
    assert s.missing_special_tokens == ("<|im_end|>", "<|im_start|>")


@pytest.mark.parametrize("row,match", [
    ({"messages": "hi"}, r"Row chat.jsonl:1: 'messages' is a str, not a list"),
    ({"messages": ["hi"]}, r"Row chat.jsonl:1, message 0 is a str, not an object"),
    ({"messages": [{"content": "hi"}]}, r"message 0 has no 'role'"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, r"message 0 has role 'bot'"),
    ({"messages": [{"role": "user"}]}, r"message 0 \(user\) has no 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, r"'content' is a int"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, r"has from 'robot'"),
    ({"instruction": "Add", "output": "2"}, r"looks like alpaca instruction .*"),
    ({"text": "plain"}, r"looks like text"),
])
def test_bad_rows_are_one_line_errors_with_the_row(row, match):
    with pytest.raises(LoraDoctorError, match=match) as e:
        tokenize_chat_rows([("chat.jsonl:1", row)], chatml_tokenizer())
    assert "\n" not in e.value.message and e.value.hint


def test_mixed_layouts_and_no_assistant_anywhere():
    with pytest.raises(LoraDoctorError, match="row chat.jsonl:2 looks like alpaca instruction"):
        tokenize_chat_rows([("chat.jsonl:1", {"messages": CONVERSATION}),
                            ("chat.jsonl:2", {"instruction": "a", "output": "b"})], chatml_tokenizer())
    with pytest.raises(LoraDoctorError, match="No row of 'the dataset' has an assistant turn"):
        tokenize_chat_rows(rows([{"role": "user", "content": "hi"}]), chatml_tokenizer())


def test_template_that_refuses_a_row_names_it():
    from chat_fixtures import mistral_tokenizer

    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(LoraDoctorError, match=r"Row chat.jsonl:1: the chat template failed .*roles must alternate"):
        tokenize_chat_rows(rows(bad), mistral_tokenizer())


def test_row_shape_and_alternation_rules():
    assert row_shape({"messages": []}) is RowShape.CHAT_OPENAI
    assert row_shape({"turns": []}, messages_field="turns") is RowShape.CHAT_OPENAI
    assert row_shape({"prompt": "x"}) is RowShape.UNKNOWN
    tool_turn = [{"role": "user", "content": "weather?"},
                 {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]},
                 {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    assert roles_alternate(tool_turn)
    assert normalize_messages({"messages": tool_turn}, "x:1", ChatStyle.OPENAI)[1]["tool_calls"]
    assert not roles_alternate([{"role": "assistant", "content": "first"}])
    assert not roles_alternate(CONVERSATION + [{"role": "system", "content": "late"}])
