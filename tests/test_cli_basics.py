import pytest
from click.testing import CliRunner

from lora_doctor.cli import cli


def test_help_lists_every_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("plan", "modules", "check", "probe", "train", "report"):
        assert name in result.output


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert "lora-doctor" in result.output


def test_unknown_command_exits_2():
    result = CliRunner().invoke(cli, ["nope"])
    assert result.exit_code == 2


def test_tiny_model_builds_for_every_family():
    from lora_doctor.tiny import TINY_CONFIGS, build_tiny_model

    for arch in TINY_CONFIGS:
        model = build_tiny_model(arch)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_click_usage_errors_are_one_line_exit_2():
    result = CliRunner().invoke(cli, ["plan", "gpt2", "--seq-len", "abc"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["Error: Invalid value for '--seq-len': 'abc' is not a valid integer. See: cli plan --help"]


def test_atomic_write_refuses_folder_and_file_parent(tmp_path):
    import pytest

    from lora_doctor.errors import LoraDoctorError
    from lora_doctor.fileio import write_text_atomic

    with pytest.raises(LoraDoctorError, match="it is a folder"):
        write_text_atomic(tmp_path, "x")
    (tmp_path / "f").write_text("")
    with pytest.raises(LoraDoctorError, match="is a file, not a folder"):
        write_text_atomic(tmp_path / "f" / "r.md", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    import os

    from lora_doctor.fileio import write_text_atomic

    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "r.md", "x")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644


def test_bare_command_prints_help_not_an_error():
    result = CliRunner().invoke(cli, [])
    assert "Usage:" in result.output and "Commands:" in result.output
    assert "Error:" not in result.output


# --- hints name flags that exist ----------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_for_hints():
    from test_checks import _shape

    return {arch: _shape(arch) for arch in ("llama", "phi3", "gpt2", "falcon")}


def _option_names(name: str) -> set[str]:
    cmd = cli.get_command(None, name)
    return {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}


def _flags_by_command(hint: str) -> list[tuple[str | None, str]]:
    """(command, flag) for every --flag in a hint: after 'lora-doctor CMD' up to the end of that clause
    (')', ';' or '. ') the flag is CMD's; elsewhere it is the running command's (None)."""
    import re

    out, pos = [], 0
    for m in re.finditer(r"lora-doctor (\w+)([^);]*?)(?=\)|;|\. |\.$|$)", hint):
        out += [(None, f) for f in re.findall(r"--[a-z][a-z0-9-]*", hint[pos:m.start()])]
        out += [(m.group(1), f) for f in re.findall(r"--[a-z][a-z0-9-]*", m.group(2))]
        pos = m.end()
    return out + [(None, f) for f in re.findall(r"--[a-z][a-z0-9-]*", hint[pos:])]


def test_every_flag_a_finding_hint_names_exists_on_that_command(shapes_for_hints):
    """A bare flag in a hint must exist on every command whose doctor can raise it (check, probe, train;
    probe and train alone for the checks that read a measured run), and a flag after 'lora-doctor plan'
    on plan. The memory-fit hint once told check users to pass --seq-len, which only plan has."""
    from test_checks import PLANTED, healthy_context

    from lora_doctor.checks import CHECKS

    healthy = healthy_context(shapes_for_hints["llama"])
    contexts = [healthy]
    for _, _, fault in PLANTED.values():
        fault = dict(fault)
        if "shape" in fault:
            fault["shape"] = shapes_for_hints[fault["shape"]]
        contexts.append(healthy.replace(**fault))
    named = set()
    for fn in CHECKS.values():
        runs_under = ("probe", "train") if fn.__module__.endswith(".probe") else ("check", "probe", "train")
        for ctx in contexts:
            named |= {(cmd or runs_under, flag) for f in fn(ctx) if f.hint for cmd, flag in _flags_by_command(f.hint)}
    assert ("plan", "--gpu") in named and (("check", "probe", "train"), "--max-length") in named
    wrong = sorted((cmd, flag) for cmd, flag in named
                   if not all(flag in _option_names(c) for c in ((cmd,) if isinstance(cmd, str) else cmd)))
    assert not wrong, wrong


def test_flags_by_command_splits_clauses():
    hint = "Largest that fits: --batch 2. Levers: --grad-ckpt; compare with lora-doctor plan m --gpu NAME."
    assert _flags_by_command(hint) == [(None, "--batch"), (None, "--grad-ckpt"), ("plan", "--gpu")]
    assert _flags_by_command("Raise it (lora-doctor plan m --seq-len 42), or --r 8") == [
        ("plan", "--seq-len"), (None, "--r")]
