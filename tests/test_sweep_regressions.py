"""Regressions found by scripts/sweep_cli.py, the end-to-end sweep of the CLI over shipped configs, tiny models of
each architecture and the engine's levers. Each case is input the sweep fed the real CLI, pinned at its source."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli
from lora_doctor.errors import LoraDoctorError
from lora_doctor.specs import LoraSpec

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}."} for i in range(8)]


def _one_error_line(result) -> str:
    """The single `Error:` line of a bad-input exit, asserting the contract (exit 2, one line, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("targets", ["", " , ", (), ("",), (" ", " ")])
def test_lora_spec_refuses_empty_targets(targets):
    # probe/train used to pass an empty list to peft, which refused it in its own words ("No `target_modules`").
    with pytest.raises(LoraDoctorError, match="No target modules given") as e:
        LoraSpec(targets=targets)
    assert "--target all-linear" in e.value.hint


@pytest.mark.parametrize("targets", ["q_proj", "q_proj, ,v_proj", ("q_proj",), "all-linear"])
def test_lora_spec_keeps_real_targets(targets):
    assert LoraSpec(targets=targets).targets == targets


@pytest.fixture
def data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize("command", ["check", "probe", "train"])
@pytest.mark.parametrize("setting, label", [("lora.targets=", "--set lora.targets is ''"),
                                            ("lora.targets=[]", "--set lora.targets is ()")])
def test_empty_targets_are_one_error_everywhere(data, tiny_llama_dir, command, setting, label):
    # check already said "No target modules given"; probe and train now say it before loading anything.
    result = CliRunner().invoke(cli, [command, "--model", str(tiny_llama_dir), "--data", str(data),
                                      "--set", setting, "--set", "train.device=cpu"])
    line = _one_error_line(result)
    assert "No target modules given" in line and label in line and "peft" not in line
    assert not (data.parent / "runs").exists()


@pytest.mark.parametrize("keep", [["config.json"], ["config.json", "model.safetensors"]])
def test_missing_tokenizer_message_is_whole(data, tiny_llama_dir, tmp_path, keep):
    # The load error kept only the first line of transformers' message: "...from one of: " and nothing after it.
    model = tmp_path / "no-tokenizer"
    model.mkdir()
    for name in keep:
        shutil.copy(tiny_llama_dir / name, model / name)
    result = CliRunner().invoke(cli, ["probe", "--model", str(model), "--data", str(data), "--steps", "1",
                                      "--no-report", "--set", "train.device=cpu"])
    line = _one_error_line(result)
    assert "tokenizer" in line and not line.rstrip().endswith("from one of:")
    assert f"The folder holds: {', '.join(sorted(keep))};" in line


@pytest.mark.parametrize("flags, phrase", [(["--epochs", "2"], "--epochs describes a dataset"),
                                           (["--grad-accum", "4"], "--grad-accum describes a dataset"),
                                           (["--grad-accum", "4", "--epochs", "2"],
                                            "--grad-accum, --epochs describe a dataset")])
def test_plan_dataset_flags_without_data(flags, phrase):
    result = CliRunner().invoke(cli, ["plan", "gpt2", *flags], env={"LORA_DOCTOR_CACHE": "0"})
    line = _one_error_line(result)
    assert phrase in line and "--data PATH" in line


EXAMPLES = __import__("pathlib").Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("args", [["check", "{cfg}"], ["probe", "{cfg}"], ["train", "{cfg}"],
                                  ["plan", "gpt2", "--config", "{cfg}"]])
@pytest.mark.parametrize("which", ["example", "minimal"])
def test_accelerate_launch_config_as_run_config(tmp_path, monkeypatch, args, which):
    # examples/fsdp.yaml given as CONFIG used to list 11-12 "Unknown key" problems and never say which file goes where.
    monkeypatch.chdir(tmp_path)
    cfg = EXAMPLES / "fsdp.yaml" if which == "example" else tmp_path / "acc.yaml"
    if which == "minimal":
        cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nnum_processes: 2\n")
    result = CliRunner().invoke(cli, [a.format(cfg=cfg) for a in args], env={"LORA_DOCTOR_CACHE": "0"})
    line = _one_error_line(result)
    assert "is an accelerate launch config" in line and "distributed_type" in line
    assert f"accelerate launch --config_file {cfg}" in line and "Unknown key" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == (["acc.yaml"] if which == "minimal" else [])


def test_one_accelerate_like_key_is_still_an_unknown_key(tmp_path, monkeypatch, tiny_llama_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text(f"model: {tiny_llama_dir}\nmixed_precision: bf16\n")
    line = _one_error_line(CliRunner().invoke(cli, ["check", "run.yaml"]))
    assert "Unknown key 'mixed_precision'" in line and "accelerate launch config" not in line


@pytest.fixture(scope="module")
def healthy():
    import sys

    sys.path.insert(0, str(EXAMPLES.parent / "tests"))
    from test_checks import _shape, healthy_context

    return healthy_context(_shape("llama"))


DEAD = {"model.layers.0.self_attn.q_proj": 0.0, "model.layers.1.mlp.up_proj": 0.0}


@pytest.mark.parametrize("labels", [[0], [0, 0, 0]], ids=["probe-no-labels-1", "probe-no-labels-3"])
def test_probe_that_scored_nothing_names_the_data(healthy, labels):
    # A 1-step probe whose batch was all prompt (max_length 32 on tiny.jsonl, batch 1) reported adapter-no-grad,
    # adapter-unchanged and loss-zero with "enable input grads" advice; the cause was the data.
    from lora_doctor.checks import run_checks

    ctx = healthy.replace(loss_trace=[0.0] * len(labels), label_tokens_trace=labels, grad_norms=DEAD,
                          weight_deltas=dict.fromkeys(DEAD, 0.0))
    codes = [f.code for f in run_checks(ctx)]
    assert "probe-no-labels" in codes
    assert not {"adapter-no-grad", "adapter-unchanged", "loss-zero"} & set(codes)
    (finding,) = [f for f in run_checks(ctx) if f.code == "probe-no-labels"]
    assert f"None of the {len(labels)} probed step(s)" in finding.message and "--max-length" in finding.hint


@pytest.mark.parametrize("labels", [[0, 7], [12], None])
def test_probe_with_labelled_tokens_keeps_the_gradient_findings(healthy, labels):
    from lora_doctor.checks import run_checks

    ctx = healthy.replace(loss_trace=[0.0] * len(labels or [0]), label_tokens_trace=labels, grad_norms=DEAD)
    codes = [f.code for f in run_checks(ctx)]
    assert "adapter-no-grad" in codes and "loss-zero" in codes and "probe-no-labels" not in codes


SHAREGPT = [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4."}]


@pytest.mark.parametrize("field", ["conversations", "messages", "dialog"])
def test_sharegpt_turns_under_data_messages_field(field):
    # data.messages_field: conversations on ShareGPT rows read them as OpenAI messages: "message 0 has no 'role'".
    from lora_doctor.chat.rows import ChatStyle, RowShape, detect_chat_style, normalize_messages, row_shape

    row = {field: SHAREGPT}
    assert row_shape(row, field) is RowShape.CHAT_SHAREGPT
    style = detect_chat_style([("d.jsonl:1", row)], field)
    assert style is ChatStyle.SHAREGPT
    assert [m["role"] for m in normalize_messages(row, "d.jsonl:1", style, field)] == ["system", "user", "assistant"]


@pytest.mark.parametrize("messages", [[{"role": "user", "content": "hi"}], [], "not a list",
                                      [{"role": "user", "from": "x", "content": "hi"}]])
def test_openai_rows_stay_openai(messages):
    from lora_doctor.chat.rows import RowShape, row_shape

    assert row_shape({"messages": messages}) is RowShape.CHAT_OPENAI


def test_check_reads_sharegpt_under_conversations(tmp_path, monkeypatch):
    from chat_fixtures import tiny_chat_model_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sg.jsonl").write_text("".join(json.dumps({"conversations": SHAREGPT}) + "\n" for _ in range(4)))
    result = CliRunner().invoke(cli, ["check", "--model", tiny_chat_model_dir(), "--data", "sg.jsonl", "--format",
                                      "chat", "--set", "data.messages_field=conversations", "--max-length", "128"])
    assert result.exit_code in (0, 1), result.output
    assert "has no 'role'" not in result.output and "4 examples" in result.output
