"""Write docs/cli.md from the CLI's own help text, so the docs never drift from the code.

    python scripts/gen_cli_docs.py          # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check  # exit 1 if docs/cli.md is stale (tests run this)
"""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from lora_doctor.cli import COMMANDS, cli

DOCS = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def help_text(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], prog_name="lora-doctor", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output.rstrip() + "\n"


def render() -> str:
    parts = ["# lora-doctor command reference", "",
             "Generated from the CLI's help by `python scripts/gen_cli_docs.py`; do not edit by hand.", "",
             "```", help_text().rstrip(), "```", ""]
    for name in COMMANDS:
        parts += [f"## lora-doctor {name}", "", "```", help_text(name).rstrip(), "```", ""]
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not DOCS.exists() or DOCS.read_text(encoding="utf-8") != text:
            print(f"{DOCS} is stale: run python scripts/gen_cli_docs.py", file=sys.stderr)
            return 1
        return 0
    from lora_doctor.fileio import write_text_atomic

    write_text_atomic(DOCS, text)
    print(f"wrote {DOCS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
