"""Typed errors. Library code raises these; only the command line (``cli/``) turns them into exit codes.

``ConfigError`` -> exit 2 (usage or configuration: a bad key, value or option combination).
``IIARuntimeError`` -> exit 1 (a missing or unreadable file, a failed run, NaN samples, ...).
Messages are one line that names what is wrong and what would be right.
"""

from __future__ import annotations


class IIAError(Exception):
    """Base class of every error the CLI reports without a traceback."""

    exit_code = 1


class ConfigError(IIAError):
    """Bad configuration or usage: exit code 2."""

    exit_code = 2


class IIARuntimeError(IIAError):
    """A runtime failure (missing file, unreadable checkpoint, NaN samples): exit code 1."""

    exit_code = 1


class MissingFileError(IIARuntimeError):
    """A file the run needs does not exist or cannot be read."""

    def __init__(self, what: str, path: object, hint: str = "") -> None:
        msg = f"{what} not found or unreadable: {path}"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)
        self.path = path


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A foreign exception's message as one short line (CLI errors are one line). For torch's weights-only
    refusals, the line that names the refused global."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = next((line for line in lines if "unsupported global" in line.lower()), " ".join(lines))
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """``"Type: message"`` on one line (whitespace collapsed, cut to ``limit`` characters): foreign code raises
    multi-line messages (e.g. a state-dict size mismatch per parameter) and CLI errors are one line."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."
