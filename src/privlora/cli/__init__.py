"""The ``privlora`` command line: parses options and calls the library, no logic of its own.

One module per command group (the layout of ``flwr/cli``): :mod:`.common` holds what they share, this module
builds the root app from them, in the order ``privlora --help`` lists them."""

from __future__ import annotations

import sys

import typer

from privlora.cli import audit, data, export, federate, incident, registry, split, tee, train, unlearn
from privlora.cli.common import CONTEXT_SETTINGS, OneLineUsageGroup

app = typer.Typer(cls=OneLineUsageGroup, add_completion=False, rich_markup_mode="markdown", no_args_is_help=True,
                  pretty_exceptions_enable=False, context_settings=CONTEXT_SETTINGS,
                  help="Fine-tune with LoRA without leaking the training data, and measure what still leaks.")

for command in (data.sanitize, train.train, federate.federate, train.generate, audit.audit, audit.spectrum,
                data.synthesize, unlearn.unlearn, export.export):
    app.command()(command)
for name, sub_app in (("base", train.base_app), ("canary", audit.canary_app), ("split", split.split_app),
                      ("registry", registry.registry_app), ("incident", incident.incident_app), ("tee", tee.tee_app)):
    app.add_typer(sub_app, name=name)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"privlora {version('privlora')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", "-V", is_eager=True, callback=_print_version,
                                       help="Print privlora's version and exit.")) -> None:
    """Fine-tune with LoRA without leaking the training data, and measure what still leaks."""


def main() -> None:
    """Console entry point."""
    app(prog_name="privlora")


if __name__ == "__main__":
    sys.exit(main())
