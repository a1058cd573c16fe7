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
