"""Bad input, one class at a time: each case exits 2 with a single `Error:` line naming the input and the
fix, prints no traceback, and leaves the folders as they were. Nothing here loads weights."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def snapshot(folder: Path) -> set:
    return {(str(p.relative_to(folder)), p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


def assert_one_error_line(result, *needles):
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert "Traceback" not in result.output and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_llama_dir):
    """A working folder with a valid run config (tiny model, tiny data); cwd moves there."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(args):
    return CliRunner().invoke(cli, args)


def run_checked(work, args, *needles):
    before = snapshot(work)
    result = invoke(args)
    assert_one_error_line(result, *needles)
    assert snapshot(work) == before


# --- absurd numbers ------------------------------------------------------------------------------

NUMERIC_FLAGS = [("--lr", "nan"), ("--lr", "inf"), ("--lr", "-inf"), ("--dropout", "nan"), ("--dropout", "inf")]
NUMERIC_KEYS = ["train.lr", "train.weight_decay", "train.max_grad_norm", "train.epochs", "data.eval_fraction",
                "loss.label_smoothing", "loss.focal_gamma", "lora.dropout"]


@pytest.mark.parametrize("flag,value", NUMERIC_FLAGS)
def test_non_finite_flag_is_refused(work, tiny_llama_dir, flag, value):
    run_checked(work, ["check", "--model", str(tiny_llama_dir), "--data", "data.jsonl", flag, value], flag)


@pytest.mark.parametrize("key", NUMERIC_KEYS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_set_value_is_refused(work, tiny_llama_dir, key, value):
    run_checked(work, ["check", "--model", str(tiny_llama_dir), "--data", "data.jsonl", "--set", f"{key}={value}"], key)


@pytest.mark.parametrize("key,value", [("lr", ".nan"), ("label_smoothing", ".inf"), ("max_grad_norm", "nan")])
def test_non_finite_file_value_names_the_file_key(work, tiny_llama_dir, key, value):
    section = "loss" if key == "label_smoothing" else "train"
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl}}\n{section}:\n  {key}: {value}\n")
    run_checked(work, ["check", "run.yaml"], f"{section}.{key}", "run.yaml", "Try:")


# An r past the wider side of every targeted layer: (model, --r, --target, the widest layer's line)
OVERSIZED_RANKS = [
    ("gpt2", "4000", "all-linear", "c_fc (768 -> 3,072, width 3,072)"),
    ("gpt2", "4,3073", "all-linear", "r=3073"),
    ("gpt2", "2500", "attn", "c_attn (768 -> 2,304, width 2,304)"),
    ("meta-llama/Llama-2-7b-hf", "20000", "all-linear", "width 11,008"),
    ("meta-llama/Llama-2-7b-hf", "5000", "qv", "q_proj (4,096 -> 4,096, width 4,096)"),
    ("microsoft/Phi-3-mini-4k-instruct", "20000", "attn", "qkv_proj"),
    ("mistralai/Mixtral-8x7B-v0.1", "100000", "all-linear", "r=100000"),
    ("tiiuae/falcon-7b", "20000", "all-linear", "width 18,176"),
]


@pytest.mark.parametrize("model,r,target,needle", OVERSIZED_RANKS)
def test_plan_refuses_a_rank_wider_than_every_targeted_layer(work, model, r, target, needle):
    run_checked(work, ["plan", model, "--r", r, "--target", target], needle, "widest targeted layer", "Try: --r")


def test_a_rank_wider_than_the_targets_but_not_the_model_names_the_wider_layers(work):
    run_checked(work, ["plan", "gpt2", "--r", "2500", "--target", "attn"], "--target c_fc")


def test_rank_between_a_layers_sides_is_still_only_a_note(work):
    result = invoke(["plan", "gpt2", "--r", "3072"])
    assert result.exit_code == 0, result.output
    assert "note: r=3072 is larger than the smallest targeted dimension" in result.stderr


@pytest.mark.parametrize("command", ["check", "probe", "train"])
@pytest.mark.parametrize("r", ["129", "100000"])
def test_run_commands_refuse_a_rank_wider_than_every_targeted_layer_before_loading(work, tiny_llama_dir, monkeypatch,
                                                                                   command, r):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("no weights may load")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    # The tiny Llama's widest layers are its 64 -> 128 MLP projections.
    run_checked(work, [command, "--model", str(tiny_llama_dir), "--data", "data.jsonl", "--r", r], f"r={r}",
                "(64 -> 128, width 128)", "lora.r")


def test_a_rank_set_in_a_run_config_is_refused_by_its_key(work, tiny_llama_dir):
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl}}\nlora: {{r: 4096, targets: qv}}\n")
    run_checked(work, ["check", "run.yaml"], "r=4096", "q_proj (64 -> 64, width 64)", "lora.r")


# Sizes past specs.MAX_SEQ_LEN (2**20 tokens) and MAX_BATCH (2**16), or ints past the float range
@pytest.mark.parametrize("flag,value", [("--batch", 10**12), ("--batch", 2**16 + 1), ("--seq-len", 10**9),
                                        ("--seq-len", 2**20 + 1), ("--seq-len", 10**30)])
def test_plan_refuses_sizes_past_the_cap(work, flag, value):
    run_checked(work, ["plan", "gpt2", flag, str(value)], flag, "at most", f"got {value}", "Try:")


def test_plan_at_the_caps_still_runs(work):
    result = invoke(["plan", "gpt2", "--seq-len", str(2**20), "--batch", str(2**16), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["seq_len"] == 2**20


@pytest.mark.parametrize("key,value", [("train.batch", 10**12), ("train.batch", 2**16 + 1),
                                       ("data.max_length", 10**9), ("data.max_length", 2**20 + 1),
                                       ("train.grad_accum", 10**25), ("lora.alpha", 10**400), ("train.seed", 10**400)])
@pytest.mark.parametrize("command", ["check", "train"])
def test_run_config_sizes_past_the_cap_are_refused(work, tiny_llama_dir, command, key, value):
    run_checked(work, [command, "--model", str(tiny_llama_dir), "--data", "data.jsonl", "--set", f"{key}={value}"],
                key, "Try:")


@pytest.mark.parametrize("section,key,value", [("train", "batch", 10**12), ("data", "max_length", 10**9)])
def test_a_size_past_the_cap_in_a_file_names_the_file_key(work, tiny_llama_dir, section, key, value):
    extra = "path: data.jsonl, " if section == "data" else ""
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl}}\n" if section != "data" else
                                   f"model: {tiny_llama_dir}\n")
    with open(work / "run.yaml", "a") as f:
        f.write(f"{section}: {{{extra}{key}: {value}}}\n")
    run_checked(work, ["check", "run.yaml"], f"{section}.{key}", "run.yaml", "at most")


# --- degenerate and foreign model configs --------------------------------------------------------

@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "vocab_size", "num_attention_heads",
                                   "intermediate_size"])
@pytest.mark.parametrize("value", [0, -4])
def test_zero_or_negative_size_names_the_field(work, field, value):
    (work / "m").mkdir()
    (work / "m" / "config.json").write_text(json.dumps({**TINY, field: value}))
    run_checked(work, ["plan", "m"], field)


@pytest.mark.parametrize("config", [
    {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100},
    {"model_type": "roberta", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100},
    {"model_type": "distilbert", "dim": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 100},
    {"model_type": "t5", "d_model": 64, "num_layers": 1},
    {"model_type": "bart", "d_model": 64, "encoder_layers": 1, "decoder_layers": 1},
])
@pytest.mark.parametrize("command", ["plan", "modules"])
def test_encoder_only_and_seq2seq_configs_are_refused(work, config, command):
    (work / "m").mkdir()
    (work / "m" / "config.json").write_text(json.dumps(config))
    run_checked(work, [command, "m"], config["model_type"], "lora-doctor plans causal LMs")


def test_remote_code_that_fails_is_one_line(work):
    (work / "m").mkdir()
    (work / "m" / "config.json").write_text(json.dumps({"model_type": "weird", "auto_map": {"AutoConfig": "conf.Conf"}}))
    (work / "m" / "conf.py").write_text("raise RuntimeError('broken remote code')\n")
    run_checked(work, ["plan", "m", "--trust-remote-code"], "custom config code")


# --- config files --------------------------------------------------------------------------------

@pytest.mark.parametrize("text,key", [
    ("model: a\nmodel: b\n", "'model'"),
    ("model: a\ntrain:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", "'train.lr'"),
    ("model: a\ntrain: {batch: 1, batch: 2}\n", "'train.batch'"),
    ("model: a\ntrain:\n  lr: 1.0e-4\ntrain:\n  batch: 2\n", "'train'"),
    ("model: a\ndata:\n  path: x.jsonl\n  eval_path: y.jsonl\n  eval_path: z.jsonl\n", "'data.eval_path'"),
])
def test_duplicate_yaml_key_is_refused(work, text, key):
    (work / "run.yaml").write_text(text)
    run_checked(work, ["check", "run.yaml"], key, "twice", "Keep one")


@pytest.mark.parametrize("value", ["missing-eval.jsonl", "/nowhere/eval.jsonl"])
def test_missing_eval_file_names_data_eval_path(work, tiny_llama_dir, value):
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata:\n  path: data.jsonl\n  eval_path: {value}\n")
    run_checked(work, ["check", "run.yaml"], "data.eval_path")


# --- data files ----------------------------------------------------------------------------------

BROKEN_DATA = {
    "renamed.parquet": b"just some text\nnot parquet at all\n",
    "empty-bytes.parquet": b"",
    "unterminated.csv": b'instruction,output\n"never closed,x\n',
    "ragged.csv": b"instruction,output\na,b,c,d\n",
    "short.csv": b"instruction,output\nonly-one\n",
    "latin1.csv": "instruction,output\ncaf\xe9,x\n".encode("latin-1"),
    "notjson.jsonl": b"{this is not json}\n",
    "list.jsonl": b"[1, 2, 3]\n",
}


@pytest.mark.parametrize("name", sorted(BROKEN_DATA))
def test_data_file_with_the_wrong_content_is_one_line(work, tiny_llama_dir, name):
    (work / name).write_bytes(BROKEN_DATA[name])
    run_checked(work, ["check", "--model", str(tiny_llama_dir), "--data", name], name)


def test_pathological_single_line_is_refused_with_its_limit(work, tiny_llama_dir, monkeypatch):
    from lora_doctor import fileio

    # The real bound is 16 MiB; a 1 KiB bound shows the same refusal without writing hundreds of MB.
    monkeypatch.setattr(fileio, "MAX_LINE_BYTES", 1024)
    monkeypatch.setattr(fileio.bounded_lines, "__defaults__", (1024,))
    (work / "huge.jsonl").write_text(json.dumps({"instruction": "a" * 5000, "output": "b"}) + "\n")
    run_checked(work, ["check", "--model", str(tiny_llama_dir), "--data", "huge.jsonl"], "huge.jsonl", "Line 1",
                "longer than")


def test_bounded_lines_never_reads_past_the_limit(tmp_path):
    from lora_doctor.errors import LoraDoctorError
    from lora_doctor.fileio import bounded_lines

    path = tmp_path / "x.jsonl"
    path.write_bytes(b"{}\n" + b"x" * 10_000)

    class Counting:
        def __init__(self, f):
            self.f, self.biggest = f, 0

        def readline(self, n):
            line = self.f.readline(n)
            self.biggest = max(self.biggest, len(line))
            return line

    with open(path, "rb") as f:
        counting = Counting(f)
        with pytest.raises(LoraDoctorError, match="Line 2"):
            list(bounded_lines(counting, path, limit=100))
    assert counting.biggest <= 101


# --- output folders ------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--output-dir", "--reports-dir"])
@pytest.mark.parametrize("value", ["", "   ", "/proc/lora-doctor-x", "/proc/x/y", "/sys/lora-doctor"])
def test_uncreatable_output_folder_is_refused_before_the_model_loads(work, tiny_llama_dir, flag, value, monkeypatch):
    from lora_doctor import engine

    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(engine.Engine, "setup", no_load)
    run_checked(work, ["train", "--model", str(tiny_llama_dir), "--data", "data.jsonl", flag, value], flag.lstrip("-")
                if not value.strip() else value)


def test_output_dir_that_is_a_file_is_refused(work, tiny_llama_dir):
    (work / "afile").write_text("x")
    run_checked(work, ["train", "--model", str(tiny_llama_dir), "--data", "data.jsonl", "--output-dir", "afile/run"],
                "afile")


# --- a fresh train into a folder holding another run ---------------------------------------------

@pytest.mark.parametrize("leftover", ["checkpoints/latest", "checkpoints/step-000010/trainer_state.pt",
                                      "train_result.json", "adapter/adapter_config.json"])
def test_fresh_train_into_another_run_is_refused(work, tiny_llama_dir, leftover):
    path = work / "run" / leftover
    path.parent.mkdir(parents=True)
    path.write_text("step-000010\n")
    run_checked(work, ["train", "--model", str(tiny_llama_dir), "--data", "data.jsonl", "--output-dir", "run"],
                "holds another run", "--resume", "--overwrite")


# --- the boundary --------------------------------------------------------------------------------

@pytest.mark.parametrize("args,target", [
    (["plan", "gpt2"], "lora_doctor.commands.plan.gather_plan"),
    (["modules", "gpt2"], "lora_doctor.resolve.resolve_model_config"),
    (["check", "CFG"], "lora_doctor.resolve.resolve_model_config"),
])
def test_an_unexpected_exception_is_one_line_exit_3_and_a_crash_file(work, tiny_llama_dir, monkeypatch, args, target):
    import importlib

    module_name, attr = target.rsplit(".", 1)
    module = importlib.import_module(module_name)

    def boom(*a, **k):
        raise ZeroDivisionError("hf_abcdefghijklmnopqrstuvwxyz123456 leaked")

    monkeypatch.setattr(module, attr, boom)
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl}}\n")
    result = invoke([a if a != "CFG" else "run.yaml" for a in args])
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[-1].startswith("Internal error: ZeroDivisionError") and "please report it" in lines[-1]
    assert "hf_abcdefghij" not in result.stderr
    crashes = list((work / "reports").glob("crash-*.md"))
    assert len(crashes) == 1
    text = crashes[0].read_text()
    assert "ZeroDivisionError" in text and "Traceback" in text and "python:" in text
    assert "hf_abcdefghij" not in text


@pytest.mark.parametrize("args,target", [
    (["check", "CFG"], "lora_doctor.resolve.resolve_model_config"),
    (["train", "CFG"], "lora_doctor.engine.Engine.setup"),
    (["probe", "CFG", "--steps", "2"], "lora_doctor.engine.Engine.setup"),
    (["train", "--model", "TINY", "--data", "data.jsonl", "--reports-dir", "flagged/reps"], "lora_doctor.engine.Engine.setup"),
])
def test_the_crash_file_goes_under_the_runs_reports_dir(work, tiny_llama_dir, monkeypatch, args, target):
    import importlib

    module_name, owner, attr = (target.rsplit(".", 2) if target.endswith("setup") else (*target.rsplit(".", 1), None))
    module = importlib.import_module(module_name)
    holder = getattr(module, owner) if attr else module
    monkeypatch.setattr(holder, attr or owner, lambda *a, **k: 1 / 0)
    (work / "run.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: data.jsonl}}\n"
                                   "output: {dir: out/run, reports_dir: out/reps}\n")
    result = invoke([{"CFG": "run.yaml", "TINY": str(tiny_llama_dir)}.get(a, a) for a in args])
    assert result.exit_code == 3, result.output
    folder = work / ("flagged/reps" if "--reports-dir" in args else "out/reps")
    crashes = list(folder.glob("crash-*.md"))
    assert len(crashes) == 1 and "ZeroDivisionError" in crashes[0].read_text()
    assert str(folder.relative_to(work)) in result.stderr
    assert not (work / "reports").exists()


def test_a_crash_before_any_config_goes_under_reports(work, monkeypatch):
    from lora_doctor import runconfig

    monkeypatch.setattr(runconfig, "read_config_file", lambda *a, **k: 1 / 0)
    (work / "run.yaml").write_text("model: x\noutput: {reports_dir: out/reps}\n")
    result = invoke(["check", "run.yaml"])
    assert result.exit_code == 3, result.output
    assert len(list((work / "reports").glob("crash-*.md"))) == 1 and not (work / "out").exists()


def test_an_unwritable_reports_dir_falls_back_to_reports(work, tmp_path):
    from lora_doctor.crash import write_crash_report

    try:
        1 / 0
    except ZeroDivisionError as e:
        path = write_crash_report(e, folder="/proc/lora-doctor-crash")
    assert path is not None and path.parent == Path("reports")


def test_keyboard_interrupt_is_still_exit_130(work, monkeypatch):
    from lora_doctor.commands import plan

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(plan, "gather_plan", interrupt)
    result = invoke(["plan", "gpt2"])
    assert result.exit_code == 130 and "Interrupted." in result.stderr
    assert not (work / "reports").exists()


def test_a_crash_file_that_cannot_be_written_still_gives_one_line(work, monkeypatch):
    from lora_doctor import crash
    from lora_doctor.commands import plan

    monkeypatch.setattr(plan, "gather_plan", lambda *a, **k: 1 / 0)
    monkeypatch.setattr(crash, "crash_text", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space")))
    result = invoke(["plan", "gpt2"])
    assert result.exit_code == 3
    assert result.stderr.strip().startswith("Internal error: ZeroDivisionError")
