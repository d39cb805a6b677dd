"""Shared CLI plumbing: typed library errors become one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from .errors import IIAError


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn IIAError into ``error: <message>`` on stderr and its exit code (2 config, 1 runtime)."""
    try:
        yield
    except IIAError as exc:
        echo_err(f"error: {exc}")
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        echo_err("interrupted")
        raise typer.Exit(130) from None
    except FileNotFoundError as exc:
        echo_err(f"error: file not found: {exc.filename or exc}")
        raise typer.Exit(1) from None
    except MemoryError:
        echo_err("error: out of memory; lower --batch")
        raise typer.Exit(1) from None
    finally:
        sys.stdout.flush()
