"""Chat data end to end on CPU: check, probe and train on the tiny "instruct" Llama with
examples/data/chat.jsonl, and the planted faults, each refused by probe/train (exit 2) and reported as an
error finding by check (exit 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chat_fixtures import tiny_chat_model_dir
from click.testing import CliRunner

from lora_doctor.cli import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CHAT = EXAMPLES / "data" / "chat.jsonl"
# What a person sees of the first conversation of chat.jsonl: the assistant's words and <|im_end|>.
MARKED_TURN = "<|im_start|>assistant\n[[Six.<|im_end|>\n]]<|im_start|>user\nAnd if you add zero more?"


@pytest.fixture(autouse=True)
def _offline(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORA_DOCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "chat-plan-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_config(tmp_path: Path, model: str, **data) -> Path:
    """examples/chat.yaml made lean for tests: no quantization, plain AdamW, few short examples."""
    cfg = yaml.safe_load((EXAMPLES / "chat.yaml").read_text())
    cfg["model"] = str(model)
    cfg["quant"] = {"mode": "none"}
    cfg["data"].update(path=str(CHAT), max_examples=8, max_length=160, eval_fraction=0.0, **data)
    cfg["train"].update(batch=2, max_steps=2, optim="adamw", grad_ckpt=False, precision="fp32", eval_every=None,
                        save_every=None)
    cfg["output"] = {"dir": str(tmp_path / "run"), "reports_dir": str(tmp_path / "reports")}
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def codes(result_json: str) -> list[tuple[str, str]]:
    return [(f["code"], f["severity"]) for f in json.loads(result_json)["findings"]]


def test_shipped_chat_config_is_valid():
    from lora_doctor.runconfig import load_run_config

    cfg = load_run_config(EXAMPLES / "chat.yaml")
    assert (cfg.data.format, cfg.data.messages_field, cfg.data.train_on) == ("chat", "messages", "all_assistant")
    assert cfg.data.path.endswith("chat.jsonl") and cfg.model.endswith("tiny-llama-chat")


def test_check_shows_the_marked_example_and_role_counts(tmp_path):
    cfg = write_config(tmp_path, tiny_chat_model_dir())
    res = invoke("check", cfg)
    assert res.exit_code == 0, res.output
    assert "generation-tags mask" in res.output and MARKED_TURN.replace("\n", "\n    ") in res.output
    res = invoke("check", cfg, "--json")
    data = json.loads(res.stdout)["data"]
    assert data["format"] == "chat" and data["n_label_tokens"] > 0
    assert set(data["role_tokens"]) == {"system", "user", "assistant"}
    assert MARKED_TURN in data["example_marked"]
    assert data["chat"]["mask_method"] == "generation-tags" and data["chat"]["mask_disagreements"] == 0
    assert data["chat"]["eot_token"] == "<|im_end|>"  # not redacted: an end-of-turn token is no credential


def test_probe_and_train_run_on_chat_data(tmp_path):
    cfg = write_config(tmp_path, tiny_chat_model_dir())
    res = invoke("probe", cfg, "--steps", "2")
    assert res.exit_code == 0, res.output
    assert "supervised text between [[ and ]]" in res.output and "[[Six.<|im_end|>" in res.output
    (md,) = (tmp_path / "reports").glob("probe-*.md")
    assert "````text\n" in md.read_text() and MARKED_TURN in md.read_text()
    (saved,) = (tmp_path / "reports").glob("probe-*.json")
    assert json.loads(saved.read_text())["data"]["role_tokens"]["assistant"] > 0
    res = invoke("train", cfg, "--set", "data.train_on=last_assistant")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run").is_dir()


def test_base_tokenizer_without_template(tmp_path, tiny_llama_dir):
    cfg = write_config(tmp_path, tiny_llama_dir)
    res = invoke("check", cfg, "--json")
    assert res.exit_code == 1 and ("chat-no-template", "error") in codes(res.stdout)
    res = invoke("probe", cfg, "--steps", "1")
    assert res.exit_code == 2 and "has no chat template" in res.output and "data.chat_template" in res.output


def test_user_template_on_a_base_tokenizer_renders(tmp_path, tiny_llama_dir):
    """data.chat_template replaces the missing one: check is healthy about the template."""
    template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    cfg = write_config(tmp_path, tiny_llama_dir, chat_template=template)
    res = invoke("check", cfg, "--json")
    found = [c for c, _ in codes(res.stdout)]
    assert "chat-no-template" not in found and json.loads(res.stdout)["data"]["chat"]["mask_method"] == "prefix-diff"


@pytest.mark.parametrize("fmt,data,needle", [
    ("instruction", CHAT, "data.format: chat"),
    ("chat", EXAMPLES / "data" / "tiny.jsonl", "data.format: instruction"),
])
def test_rows_of_another_format(tmp_path, fmt, data, needle):
    cfg = write_config(tmp_path, tiny_chat_model_dir())
    res = invoke("check", cfg, "--format", fmt, "--data", data, "--json")
    assert res.exit_code == 1, res.output
    (finding,) = [f for f in json.loads(res.stdout)["findings"] if f["code"] == "chat-format-mismatch"]
    assert finding["severity"] == "error" and needle in finding["hint"]
    res = invoke("train", cfg, "--format", fmt, "--data", data)
    assert res.exit_code == 2 and needle in res.output


def test_sharegpt_rows(tmp_path):
    cfg = write_config(tmp_path, tiny_chat_model_dir())
    res = invoke("check", cfg, "--data", EXAMPLES / "data" / "chat-sharegpt.jsonl", "--json")
    data = json.loads(res.stdout)["data"]
    assert data["chat"]["style"] == "sharegpt" and data["formats_seen"] == {"chat/sharegpt": 6}


def test_bad_row_is_one_line_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(CHAT.read_text().splitlines()[0] + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "x"}]}) + "\n")
    cfg = write_config(tmp_path, tiny_chat_model_dir())
    for command in ("check", "probe"):
        res = invoke(command, cfg, "--data", bad)
        assert res.exit_code == 2, res.output
        error = [line for line in res.output.splitlines() if line.startswith("Error:")]
        assert len(error) == 1 and "bad.jsonl:2, message 1" in error[0] and "'robot'" in error[0]
        assert "Traceback" not in res.output


def test_check_counts_chat_data_with_load_datas_code(tmp_path):
    """check's data section is the DataStats probe/train's load_data builds, chat facts included."""
    from transformers import AutoTokenizer

    from lora_doctor.data import load_data
    from lora_doctor.runconfig import load_run_config

    cfg_path = write_config(tmp_path, tiny_chat_model_dir())
    res = invoke("check", cfg_path, "--json")
    cfg = load_run_config(cfg_path, {})
    tok = AutoTokenizer.from_pretrained(tiny_chat_model_dir())
    stats = load_data(cfg.data, tok, model_id=cfg.model, embedding_rows=len(tok)).stats
    assert json.loads(res.stdout)["data"] == json.loads(json.dumps(stats.to_dict()))


def test_a_relative_chat_template_file_is_read_next_to_the_config(tmp_path, monkeypatch):
    """data.chat_template: templates/chatml.jinja in a config file means the file beside the config, as
    data.path does; inline Jinja in the same key stays the template text."""
    from lora_doctor.chat.templates import CHATML_TAGGED
    from lora_doctor.runconfig import load_run_config

    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chatml.jinja").write_text(CHATML_TAGGED)
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text("model: m\ndata: {format: chat, chat_template: templates/chatml.jinja}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(cfg_path)
    assert cfg.data.chat_template == str(tmp_path / "templates" / "chatml.jinja")
    inline = tmp_path / "inline.yaml"
    inline.write_text("model: m\ndata:\n  format: chat\n  chat_template: \"{% for m in messages %}{{ m.content }}{% endfor %}\"\n")
    assert load_run_config(inline).data.chat_template == "{% for m in messages %}{{ m.content }}{% endfor %}"
