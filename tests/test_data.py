import json

import pytest

from lora_doctor.data import IGNORE_INDEX, collate, epoch_order, load_data
from lora_doctor.errors import LoraDoctorError
from lora_doctor.data import ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT, DataConfig


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [
    {"instruction": "Add two and three.", "input": "", "output": "Five."},
    {"instruction": "Name the colour.", "input": "grass", "output": "Green."},
    {"instruction": "Say hi.", "output": "Hi."},
]


def test_instruction_masking_is_exact(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    data = load_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), max_length=128), tok)
    assert data.stats.n_examples == 3
    for ex, row in zip(data.train, ROWS):
        template = ALPACA_PROMPT_WITH_INPUT if row.get("input") else ALPACA_PROMPT
        prompt = tok(template.format(instruction=row["instruction"], input=row.get("input")))["input_ids"]
        response = tok(row["output"], add_special_tokens=False)["input_ids"]
        assert ex.input_ids == prompt + response + [tok.eos_token_id]
        # Prompt masked, response and the appended EOS trained.
        assert ex.labels == [IGNORE_INDEX] * len(prompt) + response + [tok.eos_token_id]
    assert data.stats.eos_appended and data.stats.n_label_tokens == sum(
        sum(1 for x in e.labels if x != IGNORE_INDEX) for e in data.train)
    assert data.stats.formats_seen == {"instruction+output": 2, "instruction+input+output": 1}


def test_text_format_trains_every_token(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox."}])
    data = load_data(DataConfig(path=str(p), format="text", max_length=64), tiny_tokenizer)
    ex = data.train[0]
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_collate_masks_padding(tmp_path, tiny_tokenizer):
    data = load_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS)), max_length=128), tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    for side in ("right", "left"):
        b = collate(data.train, pad, side)
        lengths = [len(e.input_ids) for e in data.train]
        assert b["input_ids"].shape == (3, max(lengths))
        assert b["attention_mask"].sum(1).tolist() == lengths
        assert (b["labels"][b["attention_mask"] == 0] == IGNORE_INDEX).all()
        assert (b["input_ids"][b["attention_mask"] == 0] == pad).all()
        short = lengths.index(min(lengths))
        assert b["attention_mask"][short, 0 if side == "right" else -1] == 1


def test_truncation_and_lost_responses_counted(tmp_path, tiny_tokenizer):
    long_prompt = {"instruction": "word " * 40, "output": "Yes."}
    rows = [long_prompt, {"instruction": "Hi.", "output": "Yes. " * 10}, {"instruction": "Hi.", "output": "Yes."}]
    data = load_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=20), tiny_tokenizer)
    s = data.stats
    assert s.n_truncated == 2
    assert s.n_response_lost == 1  # the long prompt ate the whole response
    assert all(len(e.input_ids) <= 20 for e in data.train)
    assert s.longest_tokens > 20


def test_empty_fields_and_missing_pad(tmp_path):
    from lora_doctor.tiny import tiny_tokenizer

    rows = [{"instruction": "Hi.", "output": ""}, {"instruction": "Hi.", "output": "Yes."}]
    no_pad = tiny_tokenizer(pad=None)
    data = load_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), max_length=64), no_pad)
    assert data.stats.empty_fields == {"output": 1}
    assert not data.stats.tokenizer_has_pad and data.pad_token_id == no_pad.eos_token_id
    eos_pad = load_data(DataConfig(path=str(tmp_path / "d.jsonl")), tiny_tokenizer(pad="eos"))
    assert eos_pad.stats.pad_is_eos


def test_csv_json_parquet_and_datasets_folder(tmp_path, tiny_tokenizer):
    import datasets

    (tmp_path / "d.csv").write_text("instruction,output\nHi.,Yes.\nBye.,No.\n", encoding="utf-8")
    (tmp_path / "d.json").write_text(json.dumps({"data": ROWS}), encoding="utf-8")
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for name, n in (("d.csv", 2), ("d.json", 3), ("d.parquet", 3), ("saved", 3)):
        assert load_data(DataConfig(path=str(tmp_path / name)), tiny_tokenizer).stats.n_examples == n, name


def test_eval_split_is_deterministic(tmp_path, tiny_tokenizer):
    rows = [{"instruction": f"Item {i}.", "output": "Ok."} for i in range(20)]
    cfg = DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", rows)), eval_fraction=0.2)
    a, b = load_data(cfg, tiny_tokenizer, seed=1), load_data(cfg, tiny_tokenizer, seed=1)
    assert len(a.eval) == 4 and len(a.train) == 16
    assert [e.origin for e in a.eval] == [e.origin for e in b.eval]
    assert epoch_order(10, 3407, 0) == epoch_order(10, 3407, 0) != epoch_order(10, 3407, 1)


# --- bad input: one clear error each ------------------------------------------------------------


def test_missing_file_lists_neighbours(tmp_path, tiny_tokenizer):
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(tmp_path / "trian.jsonl")), tiny_tokenizer)
    assert "not found" in e.value.message and "train.jsonl" in e.value.hint


def test_row_without_field_names_line_and_field(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"instruction": "x", "response": "y"}])
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(p)), tiny_tokenizer)
    assert "d.jsonl:2" in e.value.message and "'output'" in e.value.message and "response" in e.value.message
    assert "response_field" in e.value.hint


def test_mixed_instruction_and_text_rows_say_so(tmp_path, tiny_tokenizer):
    """Half Alpaca, half {'text'}: '--format text' would fail on row 1, so the message names the mix."""
    p = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[0], {"text": "x y"}])
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(p)), tiny_tokenizer)
    assert "mixes formats" in e.value.message and "d.jsonl:3 is a text row" in e.value.message
    assert "2 row(s) before it are instruction rows" in e.value.message and "--format" not in e.value.hint
    with pytest.raises(LoraDoctorError, match="mixes formats: row d.jsonl:2 is an instruction row"):
        load_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, ROWS[0]])), format="text"),
                  tiny_tokenizer)


def test_empty_dataset(tmp_path, tiny_tokenizer):
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(LoraDoctorError, match="empty"):
        load_data(DataConfig(path=str(tmp_path / "e.jsonl")), tiny_tokenizer)


def test_non_utf8_line_number(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(p)), tiny_tokenizer)
    assert "Line 2" in e.value.message and "UTF-8" in e.value.message and "iconv" in e.value.hint
    c = tmp_path / "d.csv"
    c.write_bytes(b"instruction,output\nok,ok\ncaf\xe9,x\n")
    with pytest.raises(LoraDoctorError, match="Line 3"):
        load_data(DataConfig(path=str(c)), tiny_tokenizer)


def test_bad_json_line(tmp_path, tiny_tokenizer):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n{not json}\n", encoding="utf-8")
    with pytest.raises(LoraDoctorError, match="Line 2 .* not valid JSON"):
        load_data(DataConfig(path=str(p)), tiny_tokenizer)


def test_max_length_too_small_for_any_response(tmp_path, tiny_tokenizer):
    p = write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(p), max_length=8), tiny_tokenizer)
    assert "max_length 8" in e.value.message and "--max-length" in e.value.hint


def test_unknown_datasets_name_offline(tiny_tokenizer, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(LoraDoctorError, match="could not be loaded"):
        load_data(DataConfig(path="no-such-org/no-such-dataset-xyz"), tiny_tokenizer)


def test_separate_eval_file_and_max_examples(tmp_path, tiny_tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", ROWS * 4)
    held = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    data = load_data(DataConfig(path=str(train), eval_path=str(held), max_examples=5), tiny_tokenizer)
    assert (len(data.train), len(data.eval), data.stats.n_eval_examples) == (5, 2, 2)


def test_folder_without_data_files_says_so(tmp_path, tiny_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(tmp_path / "empty")), tiny_tokenizer)
    assert "is a folder without data files" in e.value.message and "--data" in e.value.hint


def test_missing_relative_file_names_the_absolute_path(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path="nope.jsonl"), tiny_tokenizer)
    assert e.value.message == f"Dataset file 'nope.jsonl' not found (looked for '{tmp_path / 'nope.jsonl'}')."


def test_stats_describe_the_training_population_only(tmp_path, tiny_tokenizer):
    """Held-out rows (data.eval_fraction or data.eval_path) never reach the counts the doctor's data checks read."""
    rows = [{"instruction": f"Q{i}.", "output": f"A{i}."} for i in range(8)]
    rows += [{"instruction": "Say hi.", "input": "now", "output": ""}]  # an empty output, a third format
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = load_data(DataConfig(path=str(path), eval_fraction=0.5, max_length=128), tiny_tokenizer)
    train_origins = {e.origin for e in data.train}
    assert data.stats.n_examples == len(data.train) and data.stats.n_eval_examples == len(data.eval) > 0
    assert sum(data.stats.formats_seen.values()) == data.stats.n_examples
    odd_in_train = f"{path.name}:9" in train_origins
    assert data.stats.empty_fields == ({"output": 1} if odd_in_train else {})
    assert data.stats.longest_tokens == max(len(e.input_ids) for e in data.train)

    eval_path = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "Long " * 80, "output": ""}] * 3)
    held = load_data(DataConfig(path=str(write_jsonl(tmp_path / "t.jsonl", rows[:8])), eval_path=str(eval_path),
                                max_length=64), tiny_tokenizer)
    assert held.stats.n_eval_examples == 3 and held.stats.n_examples == 8
    assert held.stats.empty_fields == {} and held.stats.n_truncated == 0 and held.stats.n_response_lost == 0
    assert held.stats.formats_seen == {"instruction+output": 8}


# --- format: chat ----------------------------------------------------------------------------------

CHAT_ROWS = [{"messages": [{"role": "user", "content": f"What is {i} plus one?"},
                           {"role": "assistant", "content": f"{i + 1}."},
                           {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "Yes."}]}
             for i in range(10)]


@pytest.fixture(scope="module")
def chat_tok():
    from chat_fixtures import tiny_chat_tokenizer

    return tiny_chat_tokenizer()


def test_chat_examples_are_the_chat_cores_pairs(tmp_path, chat_tok):
    """load_data's Examples are tokenize_chat_rows' (input_ids, labels), with the same eval split and
    DataStats fields as the other formats, plus the chat facts."""
    from lora_doctor.chat import tokenize_chat_rows
    from lora_doctor.readers import read_rows

    path = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    cfg = DataConfig(path=str(path), format="chat", max_length=64)
    data = load_data(cfg, chat_tok)
    pairs, chat = tokenize_chat_rows(read_rows(str(path)), chat_tok, max_length=64)
    assert [(e.input_ids, e.labels) for e in data.train] == pairs
    assert [e.origin for e in data.train[:2]] == ["c.jsonl:1", "c.jsonl:2"]
    s = data.stats
    assert (s.format, s.n_examples, s.formats_seen, s.eos_appended) == ("chat", 10, {"chat/openai": 10}, False)
    assert s.n_label_tokens == chat.n_label_tokens == sum(sum(x != IGNORE_INDEX for x in lab) for _, lab in pairs)
    assert s.role_tokens == chat.role_tokens and set(s.role_tokens) == {"user", "assistant"}
    assert s.example_marked.startswith("<|im_start|>user\nWhat is 0 plus one?<|im_end|>\n<|im_start|>assistant\n[[1.<|im_end|>")
    d = json.loads(json.dumps(s.to_dict()))
    assert d["n_label_tokens"] == s.n_label_tokens and d["chat"]["mask_method"] == "generation-tags"
    held = load_data(DataConfig(path=str(path), format="chat", max_length=64, eval_fraction=0.2), chat_tok)
    assert (len(held.train), len(held.eval), held.stats.n_eval_examples) == (8, 2, 2)


def test_chat_truncation_and_train_on_last(tmp_path, chat_tok):
    path = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    short = load_data(DataConfig(path=str(path), format="chat", max_length=40), chat_tok).stats
    assert short.n_truncated == 10 and short.chat.n_truncated_assistant == 10
    full = load_data(DataConfig(path=str(path), format="chat"), chat_tok).stats
    last = load_data(DataConfig(path=str(path), format="chat", train_on="last_assistant"), chat_tok).stats
    assert 0 < last.n_label_tokens < full.n_label_tokens and last.chat.train_on == "last_assistant"
    with pytest.raises(LoraDoctorError, match="too small for any response"):
        load_data(DataConfig(path=str(path), format="chat", max_length=20), chat_tok)


def test_chat_rows_from_json_and_parquet(tmp_path, chat_tok):
    import datasets

    (tmp_path / "c.json").write_text(json.dumps(CHAT_ROWS), encoding="utf-8")
    datasets.Dataset.from_list(CHAT_ROWS).to_parquet(str(tmp_path / "c.parquet"))
    for name in ("c.json", "c.parquet"):
        assert load_data(DataConfig(path=str(tmp_path / name), format="chat"), chat_tok).stats.n_examples == 10


def test_chat_bad_input_names_the_row_and_the_fix(tmp_path, chat_tok, tiny_tokenizer):
    bad = write_jsonl(tmp_path / "bad.jsonl", CHAT_ROWS[:2] + [{"messages": "hello"}])
    with pytest.raises(LoraDoctorError, match=r"bad\.jsonl:3: 'messages' is a str"):
        load_data(DataConfig(path=str(bad), format="chat"), chat_tok)
    alpaca = write_jsonl(tmp_path / "a.jsonl", ROWS)
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(alpaca), format="chat"), chat_tok)
    assert "looks like alpaca instruction" in e.value.message and "data.format: instruction" in e.value.hint
    chat = write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS)
    with pytest.raises(LoraDoctorError) as e:
        load_data(DataConfig(path=str(chat)), chat_tok)
    assert "data.format: chat" in e.value.hint
    with pytest.raises(LoraDoctorError, match="no chat template"):
        load_data(DataConfig(path=str(chat), format="chat"), tiny_tokenizer)


def test_other_formats_record_the_row_shapes(tmp_path, tiny_tokenizer):
    stats = load_data(DataConfig(path=str(write_jsonl(tmp_path / "d.jsonl", ROWS))), tiny_tokenizer).stats
    assert stats.chat.row_shapes == {"alpaca instruction": 3} and stats.chat.declared_format == "instruction"
    assert stats.role_tokens == {} and stats.example_marked is None
