"""Bad input on the surfaces added since test_bad_input.py: plan's --stack/--gpus/--strategy/--data family, the
config keys of the chunked loss, offload, FSDP, upcast, adapter dtype and packing, and the accelerate launch
environment. Each case goes through the real CLI and must exit 2 with one `Error:` line naming the input and a fix
(every flag and key it names exists), no traceback, the folder unchanged, and no weight loaded. A small fuzz loop
per key shows none of them reaches the crash file (exit 3)."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from lora_doctor.cli import cli
from lora_doctor.runconfig import valid_keys

ROWS = [{"instruction": f"Add {i} and {i + 1}.", "output": f"{2 * i + 1}."} for i in range(16)]
RUN_COMMANDS = ["check", "probe", "train"]


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_llama_dir):
    """cwd: a folder with data.jsonl and a valid run.yaml for the tiny Llama; loading any weights fails the test,
    and the launch environment starts empty."""
    import transformers

    def no_weights(*a, **k):
        raise AssertionError("weights loaded: bad input must be refused before the load")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    for name in ("WORLD_SIZE", "MASTER_ADDR", "ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def base(tiny_llama_dir) -> list[str]:
    return ["--model", str(tiny_llama_dir), "--data", "data.jsonl", "--max-length", "64"]


def snapshot(folder: Path) -> set:
    return {(str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


def _accelerate_flags() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    return set(launch_command_parser()._option_string_actions)


def _command_flags(name: str) -> set[str]:
    import click

    cmd = cli.get_command(click.Context(cli), name)
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


_KEY = re.compile(r"(?<![\w/.'-])(?:model|quant|lora|data|train|loss|output)\.[a-z_]+\b")
_FILE_SUFFIXES = {"jsonl", "json", "csv", "parquet", "yaml", "yml", "toml", "md"}


def assert_names_exist(line: str, command: str) -> None:
    """Every --flag in the line exists on `command` (or on accelerate launch, where the hint is about launching);
    every dotted key is a config key."""
    flags = _command_flags(command)
    for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", line):
        assert flag in flags or flag in _accelerate_flags(), f"{flag} is no flag of {command}: {line}"
    for key in _KEY.findall(line):
        if key.split(".")[1] in _FILE_SUFFIXES:
            continue  # a file name (data.jsonl), not a key
        assert key in valid_keys(), f"{key} is no config key: {line}"


def run_refused(work, args, *needles, env=None):
    """Invoke, and assert the bad-input contract; returns the Error line."""
    before = snapshot(work)
    result = CliRunner(env=env).invoke(cli, args)
    assert result.exit_code == 2, (args, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert re.search(r"Try:|Default:|Set |Pass |Point |Add |Use |Unset |Start |Leave |Fix |Choose |See|Check |Re-encode |Keep |Give |Drop |Valid keys|must be one", lines[0]), \
        f"no fix named: {lines[0]}"
    assert_names_exist(lines[0], args[0])
    assert snapshot(work) == before
    return lines[0]


# --- the new config keys, by --set, in check, probe and train ----------------------------------------------------

# "yes"/"no" are YAML booleans, so they are valid for the bool keys (a JSON file below quotes them).
BOOL_BAD = ["1.5", "[]", "{}", "null", "0", "-1", str(10**9), "bogus", "''"]
BAD_VALUES = {
    "train.chunked_loss": BOOL_BAD,
    "train.offload_activations": BOOL_BAD,
    "quant.upcast_frozen": BOOL_BAD,
    "data.packing": BOOL_BAD,
    "train.loss_chunks": ["yes", "1.5", "[]", "{}", "null", "0", "-1", str(10**9), "bogus", ""],
    "train.distributed": ["yes", "1.5", "[]", "{}", "null", "0", "-1", "bogus", "FSDP", "zero3", ""],
    "lora.adapter_dtype": ["yes", "1.5", "[]", "{}", "null", "0", "bogus", "bf16", "fp16", ""],
}
CASES = [(key, value) for key, values in BAD_VALUES.items() for value in values]


@pytest.mark.parametrize("command", RUN_COMMANDS)
@pytest.mark.parametrize("key,value", CASES)
def test_bad_value_of_a_new_key_is_one_line(work, tiny_llama_dir, command, key, value):
    run_refused(work, [command, *base(tiny_llama_dir), "--set", f"{key}={value}"], f"--set {key}")


@pytest.mark.parametrize("key,value", [("train.loss_chunks", "[]"), ("lora.adapter_dtype", "[fp32]")])
def test_the_wrong_type_is_quoted_as_typed(work, tiny_llama_dir, key, value):
    line = run_refused(work, ["check", *base(tiny_llama_dir), "--set", f"{key}={value}"], key)
    assert f"got {yaml.safe_load(value)!r}" in line


@pytest.mark.parametrize("key,value", [("train.max_steps", "null"), ("train.eval_every", "null")])
def test_set_null_sets_an_optional_key_to_none(work, tiny_llama_dir, key, value):
    from lora_doctor.commands.options import config_from_cli

    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl}}\n"
                                   "train: {max_steps: 5, eval_every: 2}\n")
    cfg = config_from_cli("run.yaml", {"set_": (f"{key}={value}",)})
    assert getattr(cfg.train, key.split(".")[1]) is None
    assert config_from_cli("run.yaml", {}).train.max_steps == 5


@pytest.mark.parametrize("section,key,value", [
    ("train", "loss_chunks", "yes"), ("train", "chunked_loss", "yes"), ("data", "packing", "no"),
    ("quant", "upcast_frozen", 1), ("train", "offload_activations", None), ("train", "distributed", ["fsdp"]),
    ("lora", "adapter_dtype", {"dtype": "fp32"}), ("train", "loss_chunks", 2.5),
])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bad_value_in_a_config_file_names_the_file_key(work, tiny_llama_dir, section, key, value, suffix):
    raw = {"model": str(tiny_llama_dir), "data": {"path": "data.jsonl", "max_length": 64}}
    raw.setdefault(section, {})[key] = value
    name = f"run{suffix}"
    # Both quote "yes": a string, where an unquoted YAML yes would be the boolean true.
    (work / name).write_text(json.dumps(raw) if suffix == ".json" else yaml.safe_dump(raw))
    run_refused(work, ["check", name], f"{section}.{key} (in {name})")


# --- rules across keys ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [*RUN_COMMANDS, "plan"])
@pytest.mark.parametrize("batch", [2, 8])
def test_packing_with_flash_attention_at_batch_above_one(work, tiny_llama_dir, command, batch):
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl, max_length: 64, packing: true}}\n"
                                   f"train: {{batch: {batch}, attn_impl: flash_attention_2}}\n")
    args = ["plan", str(tiny_llama_dir), "--config", "run.yaml"] if command == "plan" else [command, "run.yaml"]
    run_refused(work, args, "data.packing (in run.yaml)", "flash_attention_2", "--batch 1", f"--grad-accum {batch}")


@pytest.mark.parametrize("command", [*RUN_COMMANDS, "plan"])
@pytest.mark.parametrize("chunks,max_length", [(64, 16), (17, 16), (10**6, 512)])
def test_loss_chunks_past_max_length(work, tiny_llama_dir, command, chunks, max_length):
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl, max_length: {max_length}}}\n"
                                   f"train: {{loss_chunks: {chunks}}}\n")
    args = ["plan", str(tiny_llama_dir), "--config", "run.yaml"] if command == "plan" else [command, "run.yaml"]
    run_refused(work, args, "train.loss_chunks (in run.yaml)", f"is {chunks}", f"data.max_length (in run.yaml) is "
                f"{max_length}", "Try: train.loss_chunks:")


@pytest.mark.parametrize("extra", [["--set", "train.loss_chunks=16", "--max-length", "16"],  # exactly one token each
                                   ["--max-length", "4"],  # the default 8 is clamped by the engine, not refused
                                   ["--set", "train.loss_chunks=64", "--max-length", "16",
                                    "--set", "train.chunked_loss=false"]])  # no chunked loss: the count is unused
def test_loss_chunks_that_run_are_not_refused(work, tiny_llama_dir, extra):
    result = CliRunner().invoke(cli, ["check", "--model", str(tiny_llama_dir), "--data", "data.jsonl", *extra])
    assert result.exit_code in (0, 1), result.output


def test_epochs_past_the_cap(work, tiny_llama_dir):
    from lora_doctor.specs import MAX_EPOCHS

    for command in RUN_COMMANDS:
        run_refused(work, [command, *base(tiny_llama_dir), "--epochs", "1e300"], "--epochs", f"{MAX_EPOCHS:,}")
    run_refused(work, ["plan", str(tiny_llama_dir), "--data", "data.jsonl", "--epochs", str(MAX_EPOCHS * 10)],
                "--epochs", "at most")
    result = CliRunner().invoke(cli, ["check", *base(tiny_llama_dir), "--epochs", str(MAX_EPOCHS)])
    assert result.exit_code in (0, 1), result.output


@pytest.mark.parametrize("command", RUN_COMMANDS)
@pytest.mark.parametrize("args,needle", [(["--data", ""], "--data"), (["--data", "   "], "--data"),
                                         (["--set", "data.eval_path="], "--set data.eval_path"),
                                         (["--set", "data.eval_path=' '"], "--set data.eval_path")])
def test_blank_data_paths_are_refused_everywhere(work, tiny_llama_dir, command, args, needle):
    # check used to skip the data checks on --data "" (exit 0) while train refused it.
    run_refused(work, [command, "--model", str(tiny_llama_dir), "--max-length", "64", *args], needle)


# --- plan's flags -----------------------------------------------------------------------------------------------

def _plan_files(work: Path) -> None:
    (work / "empty.jsonl").write_text("")
    (work / "bin.jsonl").write_bytes(bytes(range(256)) * 4)
    (work / "bin.bin").write_bytes(bytes(range(256)) * 4)
    (work / "folder.jsonl").mkdir()
    (work / "foreign.jsonl").write_text(json.dumps({"foo": 1}) + "\n")
    (work / "csv.jsonl").write_text("instruction,output\na,b\n")
    (work / "emptytok").mkdir()
    (work / "empty.yaml").write_text("")
    (work / "list.yaml").write_text("- 1\n- 2\n")
    (work / "latin.yaml").write_bytes(b"model: caf\xe9\n")
    (work / "confdir").mkdir()


PLAN_CASES = [
    (["--gpus", "0"], "--gpus"), (["--gpus", "-1"], "--gpus"), (["--gpus", str(10**9)], "--gpus"),
    (["--gpus", "1.5"], "--gpus"), (["--gpus", "yes"], "--gpus"), (["--gpus", ""], "--gpus"),
    (["--strategy", "zero3"], "--strategy"), (["--strategy", "FSDP"], "--strategy"), (["--strategy", ""], "--strategy"),
    (["--gpus", "2", "--strategy", "bogus"], "--strategy"),
    (["--stack", "trl"], "--stack"), (["--stack", ""], "--stack"),
    (["--data", "missing.jsonl"], "missing.jsonl"), (["--data", "empty.jsonl"], "empty.jsonl"),
    (["--data", "bin.jsonl"], "bin.jsonl"), (["--data", "bin.bin"], "bin.bin"),
    (["--data", "folder.jsonl"], "folder.jsonl"), (["--data", "foreign.jsonl"], "foreign.jsonl"),
    (["--data", "csv.jsonl"], "csv.jsonl"), (["--data", ""], "--data"), (["--data", " "], "--data"),
    (["--data", "data.jsonl", "--format", "chat"], "chat"), (["--data", "foreign.jsonl", "--format", "text"], "text"),
    (["--data", "data.jsonl", "--format", "alpaca"], "--format"),
    (["--data", "data.jsonl", "--max-length", "0"], "--max-length"),
    (["--data", "data.jsonl", "--max-length", "-1"], "--max-length"),
    (["--data", "data.jsonl", "--max-length", str(10**9)], "--max-length"),
    (["--data", "data.jsonl", "--max-length", "1.5"], "--max-length"),
    (["--data", "data.jsonl", "--tokenizer", "./missing-tok"], "--tokenizer './missing-tok' not found"),
    (["--data", "data.jsonl", "--tokenizer", "emptytok"], "--tokenizer 'emptytok'"),
    (["--data", "data.jsonl", "--tokenizer", "bin.bin"], "--tokenizer 'bin.bin'"),
    (["--data", "data.jsonl", "--tokenizer", ""], "--tokenizer"),
    (["--data", "data.jsonl", "--grad-accum", "0"], "--grad-accum"),
    (["--data", "data.jsonl", "--grad-accum", "-1"], "--grad-accum"),
    (["--data", "data.jsonl", "--grad-accum", str(10**9)], "--grad-accum"),
    (["--data", "data.jsonl", "--grad-accum", "yes"], "--grad-accum"),
    (["--data", "data.jsonl", "--epochs", "0"], "--epochs"), (["--data", "data.jsonl", "--epochs", "-1"], "--epochs"),
    (["--data", "data.jsonl", "--epochs", "nan"], "--epochs"), (["--data", "data.jsonl", "--epochs", "inf"], "--epochs"),
    (["--max-length", "64"], "--max-length"), (["--tokenizer", "emptytok"], "--tokenizer"),
    (["--grad-accum", "2", "--epochs", "2"], "--grad-accum, --epochs"),
    (["--config", "missing.yaml"], "missing.yaml"), (["--config", "empty.yaml"], "'empty.yaml' has no data.path"),
    (["--config", "list.yaml"], "list.yaml"), (["--config", "latin.yaml"], "latin.yaml"),
    (["--config", "confdir"], "confdir"), (["--config", ""], "empty"),
]


@pytest.mark.parametrize("args,needle", PLAN_CASES, ids=[" ".join(a) or "''" for a, _ in PLAN_CASES])
def test_plan_flag_bad_value_is_one_line(work, tiny_llama_dir, args, needle):
    _plan_files(work)
    run_refused(work, ["plan", str(tiny_llama_dir), *args], needle)


@pytest.mark.parametrize("text,needle", [
    ("model: M\n", "has no data.path"),
    ("model: M\ndata: {path: data.jsonl}\ntrain: {bogus: 1}\n", "'train.bogus'"),
    ("model: M\ndata: {path: data.jsonl, max_length: 0}\n", "data.max_length (in run.yaml)"),
    ("model: M\ndata: {path: data.jsonl}\ntrain: {grad_accum: -2}\n", "train.grad_accum (in run.yaml)"),
    ("model: M\ndata: {path: data.jsonl}\ntrain: {epochs: .inf}\n", "train.epochs (in run.yaml)"),
    ("model: M\ndata: {path: missing.jsonl}\n", "missing.jsonl"),
    ("model: M\ndata: {path: data.jsonl, packing: maybe}\n", "data.packing (in run.yaml)"),
])
def test_plan_config_with_bad_content(work, tiny_llama_dir, text, needle):
    (work / "run.yaml").write_text(text.replace("M", str(tiny_llama_dir)))
    run_refused(work, ["plan", str(tiny_llama_dir), "--config", "run.yaml"], needle)


# --- the launch environment -------------------------------------------------------------------------------------

ENVS = [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "FSDP version 1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "two"}, [], "FSDP version two"),
    ({"ACCELERATE_USE_FSDP": "true"}, ["--set", "train.distributed=ddp"], "train.distributed is 'ddp'"),
    ({"WORLD_SIZE": "abc"}, [], "WORLD_SIZE='abc'"),
    ({"WORLD_SIZE": "0"}, [], "WORLD_SIZE='0'"),
    ({"WORLD_SIZE": "-2"}, [], "WORLD_SIZE='-2'"),
    ({"WORLD_SIZE": "2.5"}, [], "WORLD_SIZE='2.5'"),
    ({"WORLD_SIZE": "2"}, [], "MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "4", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, [], "MASTER_ADDR is not set"),
]


@pytest.mark.parametrize("command", RUN_COMMANDS)
@pytest.mark.parametrize("env,extra,needle", ENVS, ids=[" ".join(f"{k}={v}" for k, v in e.items()) for e, _, _ in ENVS])
def test_a_launch_environment_no_launcher_writes_is_refused_by_check_probe_and_train(work, tiny_llama_dir, command,
                                                                                    env, extra, needle):
    # check refuses it too (it used to call these healthy while train stopped on them).
    run_refused(work, [command, *base(tiny_llama_dir), *extra], needle, env=env)


def test_fsdp_across_processes_refuses_the_bnb_optimizer_in_check_as_train_does(work, tiny_llama_dir):
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    run_refused(work, ["check", *base(tiny_llama_dir), "--quant", "none", "--optim", "paged-adamw-8bit"],
                "--optim paged-adamw-8bit", "Try: --optim adamw", env=env)


def _accelerate_env(config_file: Path) -> dict[str, str]:
    """The environment `accelerate launch --config_file CONFIG` gives its processes (accelerate's own code)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "-m", "lora_doctor.cli", "check"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k.startswith(("ACCELERATE_USE_FSDP", "FSDP_"))}


def test_examples_fsdp_yaml_is_accepted_and_a_version_1_copy_refused(work, tiny_llama_dir):
    example = Path(__file__).parent.parent / "examples" / "fsdp.yaml"
    env = _accelerate_env(example)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    ok = CliRunner(env=env).invoke(cli, ["check", *base(tiny_llama_dir), "--quant", "none", "--optim", "adamw"])
    assert ok.exit_code in (0, 1), ok.output
    run_refused(work, ["check", *base(tiny_llama_dir), "--set", "train.distributed=ddp"], "ACCELERATE_USE_FSDP=true",
                env=env)
    v1 = work / "cfgs" / "fsdp1.yaml"
    v1.parent.mkdir()
    v1.write_text(example.read_text().replace("fsdp_version: 2", "fsdp_version: 1"))
    env1 = _accelerate_env(v1)
    shutil.rmtree(v1.parent)
    for command in RUN_COMMANDS:
        run_refused(work, [command, *base(tiny_llama_dir)], "FSDP version 1", "fsdp_version: 2", env=env1)


# --- refusals before the weights load ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["probe", "train"])
@pytest.mark.parametrize("targets,needle", [("qkv_proj", "'qkv_proj'"), ("q_proj,qkv_proj", "'qkv_proj'"),
                                            ("q_proj,c_attn", "'c_attn'"), ("attn-all", "Unknown preset 'attn-all'")])
def test_targets_are_refused_before_the_weights_load(work, tiny_llama_dir, monkeypatch, command, targets, needle):
    import transformers

    def no_tokenizer(*a, **k):
        raise AssertionError("the tokenizer loaded: the targets are known from the config alone")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    run_refused(work, [command, *base(tiny_llama_dir), "--target", targets], needle, "q_proj")


def test_check_reports_as_an_error_what_train_refuses_before_the_load(work, tiny_llama_dir):
    result = CliRunner().invoke(cli, ["check", *base(tiny_llama_dir), "--target", "q_proj,qkv_proj", "--json"])
    assert result.exit_code == 1
    codes = {f["code"]: f["severity"] for f in json.loads(result.stdout)["findings"]}
    assert codes["partial-target-coverage"] == "error"


def test_a_70b_with_a_missing_target_is_refused_in_seconds(work, monkeypatch):
    import time

    from lora_doctor.tiny import tiny_tokenizer

    folder = work / "llama-70b"
    folder.mkdir()
    shipped = Path(__file__).parent.parent / "lora_doctor" / "configs" / "meta-llama--Llama-3.1-70B.json"
    (folder / "config.json").write_text(shipped.read_text())
    tiny_tokenizer().save_pretrained(folder)  # no weights at all: the refusal must not need them
    t0 = time.perf_counter()
    run_refused(work, ["train", "--model", str(folder), "--data", "data.jsonl", "--max-length", "64",
                       "--target", "q_proj,wqkv", "--output-dir", "out"], "'wqkv'")
    assert time.perf_counter() - t0 < 30
    assert not (work / "out").exists()


def test_a_model_hook_still_decides_on_the_live_model(tiny_llama_dir, tmp_path):
    from lora_doctor.errors import LoraDoctorError
    from lora_doctor.loading import resolve_source
    from lora_doctor.runconfig import load_run_config

    cfg = load_run_config(None, {"model": str(tiny_llama_dir), "lora.targets": "q_proj,unused_proj"})
    with pytest.raises(LoraDoctorError, match="unused_proj"):
        resolve_source(cfg)
    assert resolve_source(cfg, hooked=True).module_names  # left to peft_lora_config after the hook ran


# --- fuzz: no bad value reaches the crash file ------------------------------------------------------------------

def _random_values(rng: random.Random, n: int) -> list:
    pool = [None, True, False, 0, -1, 1, 2**63, -(10**30), 0.5, -2.5, 1e308, float("nan"), "", " ", "x" * 300,
            "ﬁ☃", "1e999", "- a", "{a: [", [], [1, "a"], {}, {"a": {"b": []}}, [[[]]]]
    out = rng.sample(pool, k=min(n, len(pool)))
    out += [rng.choice([rng.randint(-10**6, 10**6), rng.uniform(-1e6, 1e6),
                        "".join(rng.choice("abc_-.:{}[]0123456789 ") for _ in range(rng.randint(0, 12)))])
            for _ in range(4)]
    return out


@pytest.mark.parametrize("key", sorted(BAD_VALUES))
def test_fuzzed_values_never_crash(work, tiny_llama_dir, key):
    rng = random.Random(key)
    for value in _random_values(rng, 10):
        text = value if isinstance(value, str) else json.dumps(value, allow_nan=True)
        result = CliRunner().invoke(cli, ["check", *base(tiny_llama_dir), "--set", f"{key}={text}"])
        assert result.exit_code in (0, 1, 2), (key, text, result.output)
        assert "Traceback" not in result.output and "Internal error" not in result.stderr
        if result.exit_code == 2:
            assert len([line for line in result.stderr.splitlines() if line.startswith("Error:")]) == 1
    assert not (work / "reports").exists()


@pytest.mark.parametrize("flag", ["--gpus", "--epochs", "--grad-accum", "--max-length", "--seq-len", "--batch"])
def test_fuzzed_plan_numbers_never_crash(work, tiny_llama_dir, flag):
    rng = random.Random(flag)
    values = ["0", "-0", "1e9", "nan", "-inf", "0x10", "1_000", str(2**70), "", " 3 "]
    values += [str(rng.choice([rng.randint(-10**12, 10**12), rng.uniform(-1e12, 1e12)])) for _ in range(4)]
    for value in values:
        data = [] if flag in ("--seq-len", "--batch", "--gpus") else ["--data", "data.jsonl"]
        result = CliRunner().invoke(cli, ["plan", str(tiny_llama_dir), *data, flag, value])
        assert result.exit_code in (0, 2), (flag, value, result.output)
        assert "Traceback" not in result.output and "Internal error" not in result.stderr
    assert not (work / "reports").exists()
