from pathlib import Path

import pytest

from lora_doctor.errors import LoraDoctorError
from lora_doctor.runconfig import (DEFAULT_SEED, RunConfig, from_dict, load_run_config, parse_set, valid_keys)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_defaults_follow_qlora():
    cfg = RunConfig(model="m")
    assert cfg.train.seed == DEFAULT_SEED == 3407
    assert cfg.train.optim == "paged-adamw-8bit"
    assert cfg.quant.mode == "nf4" and cfg.quant.double_quant and cfg.quant.compute_dtype == "bf16"
    assert cfg.train.max_grad_norm == 0.3
    assert cfg.loss.kind == "ce"


def test_example_yaml_and_toml_load():
    y = load_run_config(EXAMPLES / "tiny.yaml")
    assert y.lora.r == 8 and y.train.max_steps == 30 and y.quant.mode == "nf4"
    # Relative paths resolve against the config file, so the example runs from any directory.
    assert Path(y.data.path) == EXAMPLES / "data" / "tiny.jsonl"
    t = load_run_config(EXAMPLES / "tiny-lora-gpt2.toml")
    assert t.quant.mode is None  # "none" means a 16-bit base
    assert t.lora.targets == ("c_attn", "c_proj", "c_fc")
    assert t.train.optim == "adamw" and t.train.precision == "fp32"


def test_flags_override_file(tmp_path):
    cfg = load_run_config(EXAMPLES / "tiny.yaml", {"train.lr": 1e-4, "lora.r": 4, "train.batch": None})
    assert cfg.train.lr == 1e-4 and cfg.lora.r == 4
    assert cfg.train.batch == 8  # None = flag not given: the file wins


def test_normalises_common_spellings():
    cfg = from_dict({"model": "m", "train": {"optim": "paged_adamw_8bit", "precision": "bfloat16"},
                     "quant": {"mode": "none"}, "lora": {"targets": ["q_proj", "v_proj"]}})
    assert cfg.train.optim == "paged-adamw-8bit"
    assert cfg.train.precision == "bf16"
    assert cfg.quant.mode is None
    assert cfg.lora.targets == ("q_proj", "v_proj")
    assert from_dict({"model": "m", "train": {"lr": 1}}).train.lr == 1.0  # int accepted for a float


def test_unknown_keys_list_valid_ones():
    with pytest.raises(LoraDoctorError) as e:
        from_dict({"model": "m", "train": {"learning_rate": 1e-4}}, source="run.yaml")
    assert "'train.learning_rate'" in e.value.message and "run.yaml" in e.value.message
    assert "lr" in e.value.hint and "grad_accum" in e.value.hint
    with pytest.raises(LoraDoctorError) as e:
        from_dict({"model": "m", "optimizer": {}})
    assert "Valid top-level keys" in e.value.hint


def test_every_problem_reported_once_with_the_users_names():
    raw = {"model": "m", "lora": {"r": 0}, "train": {"lr": -1, "batch": "four", "optim": "lion"}, "bogus": 1}
    with pytest.raises(LoraDoctorError) as e:
        from_dict(raw, source="tiny.yaml")
    msg = e.value.message
    assert msg.startswith("5 problems")
    for part in ("lora.r (in tiny.yaml)", "train.lr (in tiny.yaml)", "train.batch (in tiny.yaml)",
                 "train.optim (in tiny.yaml)", "'bogus'"):
        assert part in msg
    # The same bad value from a flag is named as the flag.
    with pytest.raises(LoraDoctorError) as e:
        load_run_config(EXAMPLES / "tiny.yaml", {"train.lr": -1.0}, {"train.lr": "--lr"})
    assert e.value.message.startswith("--lr must be")


def test_range_checks():
    for raw, needle in [({"train": {"eval_every": 0}}, "train.eval_every"), ({"data": {"format": "sharegpt"}}, "data.format"),
                        ({"loss": {"kind": "mse"}}, "loss.kind"), ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
                        ({"train": {"scheduler": "poly"}}, "scheduler"), ({"quant": {"mode": "int3"}}, "int3")]:
        with pytest.raises(LoraDoctorError) as e:
            from_dict({"model": "m", **raw}, source="x.yaml")
        assert needle in e.value.message, raw


def test_missing_model_and_file():
    with pytest.raises(LoraDoctorError, match="model.*required"):
        from_dict({})
    with pytest.raises(LoraDoctorError) as e:
        load_run_config(EXAMPLES / "nope.yaml")
    assert "not found" in e.value.message and "tiny.yaml" in e.value.hint


def test_yaml_syntax_error_names_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model: m\ntrain:\n  lr: [1\n")
    with pytest.raises(LoraDoctorError, match="line"):
        load_run_config(p)


def test_parse_set():
    assert parse_set(["train.batch=4", "lora.targets=q_proj,v_proj", "quant.mode=null"]) == {
        "train.batch": 4, "lora.targets": "q_proj,v_proj", "quant.mode": None}
    # YAML 1.1 reads 1e-4 as a string; the loader still takes it as the float the user meant.
    assert load_run_config(None, {"model": "m", **parse_set(["train.lr=1e-4"])}).train.lr == 1e-4
    with pytest.raises(LoraDoctorError, match="unknown key"):
        parse_set(["train.learning_rate=1"])
    with pytest.raises(LoraDoctorError, match="KEY=VALUE"):
        parse_set(["train.lr"])
    assert "train.lr" in valid_keys() and "model" in valid_keys()


def test_replace_and_train_spec():
    cfg = RunConfig(model="m").replace(**{"train.lr": 0.0, "data.max_length": 64})
    assert cfg.train.lr == 0.0
    spec = cfg.train_spec()
    assert (spec.seq_len, spec.batch, spec.optim, spec.dtype) == (64, 1, "paged-adamw-8bit", "bf16")
    assert cfg.to_dict()["train"]["lr"] == 0.0


# --- QA findings: bad bytes, flag wording, where a missing dataset was looked for, output folders --------


def test_non_utf8_config_is_one_error_naming_the_file_and_byte(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"model: tiny\xff\n")
    with pytest.raises(LoraDoctorError) as e:
        load_run_config(path)
    assert f"'{path}' is not valid UTF-8" in e.value.message and "position 11" in e.value.message
    assert "iconv" in e.value.hint


def test_steps_flag_message_has_no_yaml_null():
    from lora_doctor.commands.options import config_from_cli

    with pytest.raises(LoraDoctorError) as e:
        config_from_cli(None, {"model": "m"}, extra={"train.max_steps": 0})
    assert e.value.message == "--steps must be a positive integer; got 0."
    with pytest.raises(LoraDoctorError, match=r"train.max_steps \(in c.yaml\) must be a positive integer or null"):
        from_dict({"model": "m", "train": {"max_steps": 0}}, source="c.yaml")


def test_missing_relative_dataset_says_where_it_looked(tmp_path, monkeypatch):
    cfg_dir, cwd = tmp_path / "cfg", tmp_path / "cwd"
    cfg_dir.mkdir(), cwd.mkdir()
    (cfg_dir / "run.yaml").write_text("model: m\ndata: {path: nope.jsonl}\n")
    monkeypatch.chdir(cwd)
    with pytest.raises(LoraDoctorError) as e:
        load_run_config(cfg_dir / "run.yaml")
    assert "Dataset file 'nope.jsonl' not found" in e.value.message
    assert str(cfg_dir / "nope.jsonl") in e.value.message and str(cwd / "nope.jsonl") in e.value.message
    # Found in the working folder (the older rule): accepted as it is; datasets names are left alone.
    (cwd / "nope.jsonl").write_text("{}\n")
    assert load_run_config(cfg_dir / "run.yaml").data.path == "nope.jsonl"
    (cfg_dir / "hub.yaml").write_text("model: m\ndata: {path: tatsu-lab/alpaca}\n")
    assert load_run_config(cfg_dir / "hub.yaml").data.path == "tatsu-lab/alpaca"


def test_check_output_dir_refuses_files_and_creates_nothing(tmp_path):
    from lora_doctor.fileio import check_output_dir

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(LoraDoctorError, match="is a file, not a folder"):
        check_output_dir(a_file, "reports folder")
    with pytest.raises(LoraDoctorError, match=r"'.*notes.txt' is a file"):
        check_output_dir(a_file / "runs" / "x", "output folder")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert check_output_dir(tmp_path) == tmp_path


# --- one collect-then-raise helper; help read from the docstrings ------------------------------------


def test_several_problems_are_numbered_sentences_without_double_periods():
    from lora_doctor.errors import raise_problems

    with pytest.raises(LoraDoctorError) as e:
        raise_problems([("--r must be a positive integer, got 0.", "Try: --r 16"),
                        ("--dropout must be in [0, 1), got 2.0", "Try: --dropout 0.05."),
                        ("Unknown optimizer 'lion'.", "Try: --r 16")], "in the run config")
    assert e.value.message == ("3 problems in the run config: (1) --r must be a positive integer, got 0. "
                               "(2) --dropout must be in [0, 1), got 2.0. (3) Unknown optimizer 'lion'.")
    assert e.value.hint == "Try: --r 16; Try: --dropout 0.05"
    assert len(e.value.problems) == 3
    raise_problems([])  # nothing wrong: returns
    with pytest.raises(LoraDoctorError) as e:
        raise_problems([("Only this.", None)])
    assert (e.value.message, e.value.hint, e.value.problems) == ("Only this.", None, (("Only this.", None),))


def test_nested_spec_problems_join_the_run_config_list_flat():
    """LoraSpec lists r and dropout itself; the run config re-lists them, renamed, not nested ('0.; ...2.0..')."""
    with pytest.raises(LoraDoctorError) as e:
        from_dict({"model": "m", "lora": {"r": 0, "dropout": 2.0}, "train": {"lr": -1}}, source="tiny.yaml")
    msg = e.value.message
    assert msg.startswith("3 problems in the run config: (1) lora.r (in tiny.yaml) must be a positive integer, got 0. "
                          "(2) lora.dropout (in tiny.yaml) must be in [0, 1), got 2.0. (3) train.lr (in tiny.yaml)")
    assert ".." not in msg and ".;" not in msg and ".." not in e.value.hint
    from lora_doctor.specs import LoraSpec

    with pytest.raises(LoraDoctorError) as e:
        LoraSpec(r=0, dropout=2.0)
    assert e.value.message == ("2 problems: (1) --r must be a positive integer, got 0. "
                               "(2) --dropout must be in [0, 1), got 2.0.")


def test_flag_help_is_the_attribute_docstring():
    from lora_doctor.commands.options import attribute_docs, flag_help, shared_flags
    from lora_doctor.runconfig import TrainConfig

    assert attribute_docs(TrainConfig)["lr"] == "Peak learning rate (--lr). QLoRA used 2e-4 for 7B-13B models."
    assert flag_help("lr") == ("Peak learning rate. QLoRA used 2e-4 for 7B-13B models.  "
                               "[config key: train.lr, default 0.0002]")
    assert flag_help("grad-ckpt").startswith("Gradient checkpointing.  [config key: train.grad_ckpt, default --grad-ckpt]")
    assert "(--" not in flag_help("max-length") and "data.max_length, default 512" in flag_help("max-length")
    for flag in shared_flags():  # every shared flag has a docstring to show
        assert not flag_help(flag).startswith("["), flag


def test_run_options_keep_every_flag_and_parse_like_before():
    import click
    from click.testing import CliRunner

    from lora_doctor.commands.options import config_from_cli, run_options

    seen = {}

    @click.command()
    @run_options
    def cmd(**params):
        seen.update(params)

    args = ["--model", "m", "--format", "text", "--max-length", "64", "--quant", "none", "--r", "4", "--alpha", "8",
            "--dropout", "0.1", "--target", "q_proj,v_proj", "--dora", "--no-rslora", "--batch", "2",
            "--grad-accum", "3", "--lr", "1e-4", "--scheduler", "cosine", "--warmup", "5", "--epochs", "2",
            "--optim", "adamw", "--no-grad-ckpt", "--precision", "fp32", "--seed", "7", "--eval-every", "10",
            "--save-every", "20", "--device", "cpu", "--loss", "focal", "--output-dir", "o", "--reports-dir", "r",
            "--set", "train.log_every=5"]
    result = CliRunner().invoke(cmd, args)
    assert result.exit_code == 0, result.output
    cfg = config_from_cli(None, seen)
    assert (cfg.data.format, cfg.data.max_length, cfg.quant.mode, cfg.lora.r, cfg.lora.alpha) == ("text", 64, None, 4, 8)
    assert cfg.lora.targets == ("q_proj", "v_proj") and cfg.lora.use_dora and not cfg.lora.use_rslora
    t = cfg.train
    assert (t.batch, t.grad_accum, t.lr, t.scheduler, t.warmup_steps, t.epochs, t.optim, t.grad_ckpt) == (
        2, 3, 1e-4, "cosine", 5, 2.0, "adamw", False)
    assert (t.precision, t.seed, t.eval_every, t.save_every, t.device, t.log_every) == ("fp32", 7, 10, 20, "cpu", 5)
    assert (cfg.loss.kind, cfg.output.dir, cfg.output.reports_dir) == ("focal", "o", "r")
    assert "--scheduler" in CliRunner().invoke(cmd, ["--scheduler", "poly"]).output  # Click still checks choices
    with pytest.raises(LoraDoctorError, match="No config file and no --model"):
        config_from_cli(None, {})


def test_runconfig_has_no_click_and_data_does_not_import_runconfig():
    import ast
    import inspect

    import lora_doctor.data
    import lora_doctor.runconfig

    def imports(module):
        tree = ast.parse(inspect.getsource(module))
        return {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports(lora_doctor.runconfig) if m.startswith("click")}
    assert "runconfig" not in imports(lora_doctor.data)
