import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_generated_from_current_help():
    gen = _gen()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == gen.render(), (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py")


def test_every_command_has_help_with_examples():
    gen = _gen()
    for name in gen.COMMANDS:
        text = gen.help_text(name)
        assert f"Usage: lora-doctor {name}" in text
