"""Click only: parse -> call -> render -> map errors. No math here.

Each subcommand lives in lora_doctor/commands/<name>.py as a click.Command named `command`, and is
imported lazily so `lora-doctor plan` never pays for importing bitsandbytes.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from . import __version__
from .errors import LoraDoctorError

# name -> (module, one-line help shown by `lora-doctor --help` without importing the module)
COMMANDS = {
    "plan": ("lora_doctor.commands.plan", "Trainable counts and memory budgets from the config alone (meta device)."),
    "modules": ("lora_doctor.commands.modules", "List the LoRA-targetable Linear/Conv1D leaves of a model."),
    "check": ("lora_doctor.commands.check", "Static diagnostics of a run config in seconds; no weights loaded."),
    "probe": ("lora_doctor.commands.probe", "A short real QLoRA run that measures memory, gradient flow and loss."),
    "train": ("lora_doctor.commands.train", "The full run, same engine and config as the probe."),
    "report": ("lora_doctor.commands.report", "Re-render a JSON result as Markdown."),
    "compare": ("lora_doctor.commands.compare", "Compare training runs (or a sweep): table, curves, JSON."),
}

# Click >= 8.2 raises this for a bare group invocation; older Clicks print the help themselves.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module_name, short_help = COMMANDS[name]
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                return None
            raise
        cmd = module.command
        cmd.short_help = cmd.short_help or short_help
        return cmd

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        # Click's own usage errors print three lines (usage, hint, error); bad input here gets one line
        # and exit code 2 like every LoraDoctorError.
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NO_ARGS_IS_HELP as e:
            # `lora-doctor` alone: the help itself, not an error line wrapped around it.
            click.echo(e.format_message(), err=True)
            sys.exit(e.exit_code)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx is not None else (prog_name or "lora-doctor")
            click.echo(f"Error: {e.format_message()} See: {command} --help", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"Error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except LoraDoctorError as e:
            # One line, no traceback, exit 2: the contract for bad input.
            click.echo(f"Error: {e.message}" + (f" {e.hint}" if e.hint else ""), err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as e:  # noqa: BLE001 - the boundary: a bug becomes one line, never a traceback
            ctx.exit(_internal_error(e))


EXIT_INTERNAL = 3
"""Exit code of a bug in lora-doctor; 1 means findings, 2 bad input."""


def _internal_error(e: Exception) -> int:
    from .crash import write_crash_report
    from .report.env import redact_text

    crash = write_crash_report(e)
    where = f" (details in {crash})" if crash is not None else ""
    text = " ".join(str(e).split())[:200] or "no message"
    click.echo(redact_text(f"Internal error: {type(e).__name__}: {text}{where} — please report it."), err=True)
    return EXIT_INTERNAL


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="lora-doctor")
def cli():
    """Will your LoRA/QLoRA fine-tune fit, learn, and not silently fail?

    \b
    Examples:
      lora-doctor plan mistralai/Mistral-7B-v0.1 --r 16
      lora-doctor modules microsoft/Phi-3-mini-4k-instruct
      lora-doctor check examples/tiny.yaml
      lora-doctor probe examples/tiny.yaml
    """


def main():
    # Keep the run quiet and offline-friendly by default; users can still override these.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    # bitsandbytes' CPU backend warns at import that an optional faster kernel (from the `kernels`
    # package) is absent; nothing is wrong, and on a first run it reads like a failed install.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    cli(prog_name="lora-doctor")


if __name__ == "__main__":
    sys.exit(main())
