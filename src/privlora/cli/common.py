"""What every command module shares: the one-line error contract, the offline defaults, config overrides from
flags, comma-separated names, the run-directory argument and the registry options."""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import typer
from typer.core import TyperGroup

from privlora.errors import UserError

F = TypeVar("F", bound=Callable[..., Any])

#: ``-h`` beside ``--help`` on every command (click passes it down to every sub-context)
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


class OneLineUsageGroup(TyperGroup):
    """The root group: a usage error anywhere below it (unknown option, bad number, a value outside a choice)
    is one ``error:`` line on stderr and exit 2 — the same contract as a :class:`UserError`, so a script or
    test reads bad input the same way whichever layer refused it. Bare ``privlora`` still prints the help."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _usage_errors_as_one_line():
            return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _usage_errors_as_one_line():
            return super().invoke(ctx)


@contextlib.contextmanager
def _usage_errors_as_one_line() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        message = " ".join(error.format_message().split())  # click's messages may wrap; keep them one line
        typer.echo(f"error: {message}{hint}", err=True)
        raise typer.Exit(code=error.exit_code) from None


def one_line_errors(fn: F) -> F:
    """Print a :class:`UserError` as one line on stderr and exit with its code (2; 130 on Ctrl-C); a failed
    file operation (full or read-only disk, no permission: :func:`privlora.errors.file_error`) likewise."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(code=e.exit_code) from None
        except ModuleNotFoundError as e:  # an optional part (privlora.extras) that is not installed
            from privlora.extras import missing_extra

            if (hint := missing_extra(e)) is None:
                raise
            typer.echo(f"error: {hint}", err=True)
            raise typer.Exit(code=hint.exit_code) from None
        except Exception as e:  # noqa: BLE001 - only file failures are handled, the rest re-raised
            from privlora.errors import file_error

            failure = file_error(e)
            if failure is None:
                raise
            typer.echo(f"error: {failure}", err=True)
            raise typer.Exit(code=failure.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def group(help: str, **kwargs: Any) -> typer.Typer:  # noqa: A002 - typer's own name for it
    """A command group as every module makes one: help on no arguments, ``-h``."""
    return typer.Typer(no_args_is_help=True, context_settings=CONTEXT_SETTINGS, help=help, **kwargs)


def offline_defaults() -> None:
    """No telemetry, and warnings as one ``warning:`` line instead of a source-code excerpt."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"  # type: ignore[assignment]
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def overrides(named: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Config overrides from named flags and ``--set KEY=VALUE``: named flags win over --set, which wins
    over the config file. σ and a target ε are alternatives: naming one drops the other from the file."""
    from privlora.config import CLEAR, parse_assignment

    named = dict(named)
    sigma, target = named.get("dp.noise_multiplier"), named.get("dp.target_epsilon")
    if sigma is not None and target is None:
        named["dp.target_epsilon"] = CLEAR
    if target is not None and sigma is None:
        named["dp.noise_multiplier"] = CLEAR
    result: dict[str, Any] = dict(parse_assignment(a) for a in assignments)
    if named.get("data.split") is not None:  # a named preset replaces the file's fractions, not --set's
        for key in ("data.members", "data.aux", "data.eval"):
            result.setdefault(key, CLEAR)
    result.update({k: v for k, v in named.items() if v is not None})
    return result


def names(value: str) -> tuple[str, ...]:
    """A comma-separated option → names; 'none' (or empty) → no names."""
    found = tuple(v.strip() for v in value.split(",") if v.strip())
    return () if found in ((), ("none",)) else found


def choice(values: Sequence[str]) -> click.Choice:
    """A fixed set of values: ``--help`` lists them and anything else is a one-line usage error."""
    return click.Choice(list(values))


#: the hidden ``--run`` that commands taking a run directory kept from before RUN became positional
RUN_ALIAS_HELP = "Same as the RUN argument (kept for older scripts)."


def one_run(positional: Path | None, alias: Path | None, command: str) -> Path:
    """The run directory of a command that takes one, given as RUN or (older scripts) ``--run RUN``."""
    if positional is not None and alias is not None:
        raise UserError("give the run directory as RUN or with --run, not both")
    run = positional if positional is not None else alias
    if run is None:
        raise UserError(f"give the run directory: privlora {command} RUN")
    return run


def run_list(positional: Sequence[Path] | None, alias: Sequence[Path] | None) -> list[Path]:
    """Run directories given as RUN... or with the hidden ``--run``: one way or the other, not both (mixing
    them would make their order, which reports follow, depend on how the shell line was written)."""
    if positional and alias:
        raise UserError("give the run directories as arguments or with --run, not both")
    return list(positional or alias or [])


REG_URL = typer.Option("http://127.0.0.1:8770", "--url", envvar="PRIVLORA_REGISTRY_URL", show_envvar=False,
                       help="Registry URL (or PRIVLORA_REGISTRY_URL).")
REG_TOKEN = typer.Option(None, "--token", envvar="PRIVLORA_REGISTRY_TOKEN", show_envvar=False,
                         help="Your API token (or PRIVLORA_REGISTRY_TOKEN).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


def registry_client(url: str, token: str | None) -> Any:
    """The HTTP client of the registry commands (imported on use: httpx is not needed for the others)."""
    from privlora.registry.client import RegistryClient

    return RegistryClient(url, token or "")
