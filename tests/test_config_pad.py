"""A config whose pad_token_id has no embedding row cannot be built (nn.Embedding's padding_idx): one line, exit 2,
in plan on the fast path and the meta path alike, not an AssertionError from torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import lora_doctor
from lora_doctor.cli import cli

CONFIGS = Path(lora_doctor.__file__).parent / "configs"


def _config(tmp_path: Path, name: str, **changes) -> Path:
    c = json.loads((CONFIGS / name).read_text())
    c.update(num_hidden_layers=2, n_layer=2, **changes)  # small: the meta path must stay fast
    if "n_layer" not in json.loads((CONFIGS / name).read_text()):
        c.pop("n_layer")
    folder = tmp_path / name.removesuffix(".json")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(c))
    return folder


@pytest.mark.parametrize("name", ["meta-llama--Llama-3.2-1B.json", "microsoft--Phi-3-mini-4k-instruct.json",
                                  "openai-community--gpt2.json", "Qwen--Qwen2.5-0.5B.json", "facebook--opt-125m.json"])
@pytest.mark.parametrize("offset", [0, 7])
def test_pad_id_past_the_vocabulary_is_bad_input(tmp_path, monkeypatch, name, offset):
    monkeypatch.setenv("LORA_DOCTOR_CACHE", "0")
    vocab = json.loads((CONFIGS / name).read_text())["vocab_size"]
    folder = _config(tmp_path, name, pad_token_id=vocab + offset)
    result = CliRunner().invoke(cli, ["plan", str(folder)])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and f"pad_token_id = {vocab + offset}" in errors[0] and "null, or an id below" in errors[0]
    assert "Traceback" not in result.output and "Internal error" not in result.output


@pytest.mark.parametrize("pad", [None, 0, -1])
def test_pad_ids_torch_accepts_still_plan(tmp_path, monkeypatch, pad):
    monkeypatch.setenv("LORA_DOCTOR_CACHE", "0")
    folder = _config(tmp_path, "meta-llama--Llama-3.2-1B.json", pad_token_id=pad)
    result = CliRunner().invoke(cli, ["plan", str(folder), "--json"])
    assert result.exit_code == 0, result.output
