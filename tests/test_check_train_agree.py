"""check and train agree (issue 11): whatever train refuses, check reports as an error (exit 1, or exit 2 for
the same bad input); whatever check calls healthy (exit 0), train starts and finishes.

Each planted fault goes through both commands on a tiny local Llama, two optimizer steps on CPU.
"""

import json

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}."} for i in range(24)]

# case -> (extra YAML for the data section, the rows: None for ROWS)
FAULTS = {
    "healthy": ("", None),
    "eval-missing": ("eval_path: nope.jsonl", None),
    "eval-empty": ("eval_path: empty.jsonl", None),
    "every-response-cut": ("max_length: 4", None),
    "row-without-response": ("", ROWS + [{"instruction": "Say hi."}]),
    "every-response-empty": ("", [{"instruction": f"Q {i}.", "output": ""} for i in range(24)]),
}


def _config(tmp_path, tiny_llama_dir, data_extra: str, rows) -> str:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (ROWS if rows is None else rows)), encoding="utf-8")
    (tmp_path / "empty.jsonl").write_text("")
    extra = f", {data_extra}" if data_extra else ""
    if "max_length" not in data_extra:
        extra += ", max_length: 64"
    path = tmp_path / "run.yaml"
    path.write_text(
        f"model: {tiny_llama_dir}\nquant: {{mode: nf4, compute_dtype: bf16}}\nlora: {{r: 4, dropout: 0.0}}\n"
        f"data: {{path: {data}{extra}}}\ntrain: {{batch: 2, max_steps: 2, lr: 2.0e-4, optim: adamw}}\n"
        f"output: {{dir: {tmp_path / 'run'}, reports_dir: {tmp_path / 'reports'}, plot: false}}\n")
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAULTS))
def test_check_and_train_agree(case, tmp_path, tiny_llama_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _config(tmp_path, tiny_llama_dir, *FAULTS[case])
    check = CliRunner().invoke(cli, ["check", cfg, "--json"])
    train = CliRunner().invoke(cli, ["train", cfg, "--no-report"])
    assert check.exit_code in (0, 1, 2) and train.exit_code in (0, 1, 2), (check.output, train.output)
    if train.exit_code != 0:
        assert check.exit_code != 0, f"train refused but check called it healthy:\n{train.output}"
    if check.exit_code == 0:
        assert train.exit_code == 0, f"check called it healthy but train refused:\n{train.output}"
    if case == "healthy":
        assert check.exit_code == 0 and train.exit_code == 0, (check.output, train.output)
    else:
        assert check.exit_code != 0, check.output
