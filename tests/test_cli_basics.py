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
