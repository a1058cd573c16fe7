"""docs/cli.md is what scripts/gen_cli_docs.py generates from the CLI now, and lists every command and option."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "cli.md"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli_docs", ROOT / "scripts" / "gen_cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> dict[str, str]:
    """'## lora-doctor NAME' heading -> the text up to the next heading."""
    parts = re.split(r"^## lora-doctor (\w+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_is_generated_from_current_help():
    gen = _gen()
    assert DOCS.read_text(encoding="utf-8") == gen.render(), "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
    assert gen.main(["--check"]) == 0


def test_cli_reference_lists_every_command_and_every_option():
    from lora_doctor.cli import COMMANDS, cli

    sections = _sections(DOCS.read_text(encoding="utf-8"))
    assert list(sections) == list(COMMANDS)
    for name, text in sections.items():
        command = cli.get_command(None, name)
        assert f"Usage: lora-doctor {name}" in text
        options = [opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("-")]
        assert options, name
        for opt in options:
            assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,/=]|$)", text, re.M), f"{name}: {opt} missing"


def test_every_command_has_help_with_examples():
    gen = _gen()
    for name in gen.COMMANDS:
        text = gen.help_text(name)
        assert f"Usage: lora-doctor {name}" in text
        assert "Examples:" in text, name


def test_shared_option_help_comes_from_the_config_docstrings():
    from lora_doctor.commands.options import flag_help

    check = _sections(DOCS.read_text(encoding="utf-8"))["check"]
    flat = " ".join(check.split())
    for flag in ("lr", "max-length", "target"):
        assert " ".join(flag_help(flag).split()) in flat, flag


def test_readme_counts_the_catalogue_as_docs_checks_md_does():
    """The README's 'N checks that cover M failure modes' is the registry's count, not a number that drifts."""
    import re

    from lora_doctor.checks.catalogue import markdown

    n_checks, n_modes = re.search(r"(\d+) checks cover (\d+) failure modes", markdown()).groups()
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert f"{n_checks} checks that cover {n_modes} failure modes" in readme
