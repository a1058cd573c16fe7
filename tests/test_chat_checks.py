"""The chat-data findings: each with a planted fault and a healthy context (hand-built ChatStats)."""

import dataclasses

import pytest

from lora_doctor.chat import ChatStats, MaskMethod
from lora_doctor.checks import CheckContext, Severity
from lora_doctor.checks import chat as checks

HEALTHY = ChatStats(
    row_shapes={"chat/openai": 30}, style="openai", n_examples=30, role_tokens={"user": 400, "assistant": 200},
    n_label_tokens=150, n_assistant_turns=45, mask_method=MaskMethod.GENERATION_TAGS, mask_disagreements=0,
    eot_token_id=128009, eot_token="<|eot_id|>", bos_token="<|begin_of_text|>", pad_is_eot=False,
    has_template=True, has_generation_tags=True, train_on="all_assistant", max_length=512,
    template_and_tokenizer_add_bos=False)

ALL_CHECKS = [getattr(checks, name) for name in dir(checks) if name.startswith("check_chat_")]

FAULTS = [
    ("chat-format-mismatch", Severity.ERROR, dict(declared_format="instruction", style=None, n_examples=0),
     "data.format: chat"),
    ("chat-format-mismatch", Severity.ERROR,
     dict(declared_format="chat", row_shapes={"alpaca instruction": 30}, style=None, n_examples=0),
     "data.format: instruction"),
    ("chat-no-template", Severity.ERROR, dict(has_template=False, style=None, n_examples=0), "data.chat_template"),
    ("chat-mask-empty", Severity.ERROR, dict(n_label_tokens=0, n_zero_label_examples=30), "data.chat_template"),
    ("chat-mask-covers-prompt", Severity.ERROR, dict(n_prompt_label_tokens=400), "data.chat_template"),
    ("chat-mask-disagree", Severity.WARNING, dict(mask_disagreements=3), "data.chat_template"),
    ("chat-eot-unsupervised", Severity.ERROR, dict(n_turns_eot_unsupervised=45), "<|eot_id|>"),
    ("chat-truncated", Severity.WARNING, dict(n_truncated_assistant=4, n_all_assistant_lost=1, n_eot_lost=4),
     "data.max_length"),
    ("chat-truncated", Severity.ERROR, dict(n_truncated_assistant=30, n_all_assistant_lost=30), "data.train_on"),
    ("chat-pad-is-eot", Severity.WARNING, dict(pad_is_eot=True), "pad_token"),
    ("chat-bos-twice", Severity.WARNING, dict(n_bos_twice=30), "data.chat_template"),
    ("chat-bos-twice", Severity.INFO, dict(template_and_tokenizer_add_bos=True), "add_special_tokens=False"),
    ("chat-empty-assistant", Severity.WARNING, dict(n_empty_assistant=10), "data.path"),
    ("chat-roles-alternate", Severity.WARNING, dict(n_non_alternating=12, rows_non_alternating=("c.jsonl:3",) * 10),
     "data.path"),
    ("chat-no-assistant-turn", Severity.WARNING, dict(n_no_assistant=1, rows_no_assistant=("c.jsonl:7",)), "data.path"),
    ("chat-special-token-missing", Severity.ERROR, dict(missing_special_tokens=("<|im_start|>",)), "data.chat_template"),
    ("chat-special-token-outside-embedding", Severity.ERROR,
     dict(special_tokens_outside_embedding=("<|im_end|>",), embedding_rows=128256), "len(tokenizer)"),
    ("chat-empty-think", Severity.WARNING, dict(n_empty_think=45), "data.chat_template"),
]


def _run(ctx):
    return [f for check in ALL_CHECKS for f in check(ctx)]


def test_healthy_chat_and_no_chat_give_no_finding():
    assert _run(CheckContext(chat=HEALTHY)) == []
    assert _run(CheckContext()) == []
    assert _run(CheckContext(chat=dataclasses.replace(HEALTHY, declared_format="instruction",
                                                      row_shapes={"alpaca instruction": 9}))) == []


@pytest.mark.parametrize("code,severity,planted,hint_has", FAULTS, ids=[f[0] + "-" + f[1].value for f in FAULTS])
def test_planted_fault(code, severity, planted, hint_has):
    findings = _run(CheckContext(chat=dataclasses.replace(HEALTHY, **planted), model_id="meta-llama/Llama-3.2-1B"))
    assert [(f.code, f.severity) for f in findings] == [(code, severity)]
    assert hint_has in findings[0].hint or hint_has in findings[0].message


def test_row_lists_are_capped_and_named():
    ctx = CheckContext(chat=dataclasses.replace(HEALTHY, n_non_alternating=12, rows_non_alternating=("c.jsonl:3",) * 10))
    assert "and 2 more" in _run(ctx)[0].message


def test_pad_is_eot_is_info_when_padding_is_masked_by_position():
    ctx = CheckContext(chat=dataclasses.replace(HEALTHY, pad_is_eot=True), padding_masked_by_position=True)
    assert [f.severity for f in _run(ctx)] == [Severity.INFO]


def test_checks_are_registered():
    from lora_doctor.checks import CHECKS

    assert {fn.__name__.removeprefix("check_") for fn in ALL_CHECKS} <= set(CHECKS)


def test_every_data_key_a_chat_finding_names_exists():
    """Hints and messages name config keys (data.chat_template, data.train_on, ...): each must be a real
    DataConfig field, so `--set data.KEY=...` and the config file accept it."""
    import re

    from lora_doctor.data import DataConfig

    named = set()
    for _, _, planted, _ in FAULTS:
        for f in _run(CheckContext(chat=dataclasses.replace(HEALTHY, **planted), model_id="m")):
            named |= set(re.findall(r"\bdata\.([a-z_]+)", f.hint + " " + f.message))
    assert {"chat_template", "train_on", "max_length", "path", "format"} <= named
    assert named <= {f.name for f in dataclasses.fields(DataConfig)}, named - {f.name for f in dataclasses.fields(DataConfig)}


def test_eos_absent_from_chat_labels_is_no_finding_when_the_turn_ends_on_its_own_token():
    """Llama 3 style: the labels teach <|eot_id|>, not EOS <|end_of_text|>: eos-never-learned stays quiet for
    chat data (chat-eot-unsupervised owns the stop token), and still fires for the same labels without chat."""
    from lora_doctor.checks.tokens import check_eos_learning

    labels = [[-100, -100, 5, 6, 128009], [-100, 7, 128009]]
    base = CheckContext(eos_token_id=128001, eos_token="<|end_of_text|>", pad_token_id=128004, labels=labels)
    assert [f.code for f in check_eos_learning(base)] == ["eos-never-learned"]
    assert check_eos_learning(dataclasses.replace(base, chat=HEALTHY)) == []
    same_token = dataclasses.replace(HEALTHY, eot_token_id=128001)
    assert [f.code for f in check_eos_learning(dataclasses.replace(base, chat=same_token))] == ["eos-never-learned"]
