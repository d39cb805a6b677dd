"""Shared CLI plumbing: typed library errors and usage errors become one-line messages and exit codes."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from typer.core import TyperGroup

from iia_cli.config.experiment import ExperimentConfig, load_config, parse_set
from iia_cli.runtime import dist, envvars
from iia_cli.runtime.errors import IIAError
from iia_cli.runtime.progress import log

CONFIG_HELP = ("YAML experiment config (sections model, grid, sampler, calibration, output, fid, evaluate); "
               "default: the built-in testbed config (configs/mnist-testbed.yaml: a trained MNIST network shipped in the "
               "package). EDM pickles run only NVlabs/edm's "
               "own embedded source unless model.trust_code: true.")

BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n"}
# the built-in config of runs without --config
DEFAULT_CONFIG = Path(__file__).parent.parent / "config" / "default.yaml"
SET_HELP = ("Override any config key, e.g. --set grid.rho=5 --set evaluate.methods=ddim,iia-ddim (a list as a,b "
            "or [a, b]); repeatable.")


def set_option() -> Any:
    """The ``--set KEY=VALUE`` option, shown the same way in every command."""
    return typer.Option(None, "--set", metavar="KEY=VALUE", help=SET_HELP)


@functools.lru_cache(maxsize=1)
def _builtin_tree() -> dict[str, Any]:
    import yaml

    return yaml.safe_load(DEFAULT_CONFIG.read_text()) or {}


def show_value(value: Any) -> str:
    """A config value as help texts show it: on/off, a,b for lists, none."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(show_value, value))
    return "none" if value is None else str(value)


def key_defaults(key: str) -> tuple[Any, Any]:
    """A ``section.key``'s value in the built-in config (runs without --config) and its schema default (a config
    that omits it)."""
    from iia_cli.config.experiment import ExperimentConfig

    section, name = key.split(".")
    field = ExperimentConfig.model_fields[section].default_factory.model_fields[name]  # type: ignore[union-attr]
    schema = field.get_default(call_default_factory=True)
    builtin = (_builtin_tree().get(section) or {}).get(name, schema)
    return builtin, schema


def key_help(key: str, text: str | None = None) -> str:
    """The help of an option that sets config key ``key``: ``text`` (default: the schema's description) and the
    default from the schema and the built-in config, so that help and runs cannot disagree::

        Calibration noises |B| (calibration.samples; default 64 without --config, 200 when a config omits it).
    """
    from iia_cli.config.experiment import ExperimentConfig

    if text is None:
        section, name = key.split(".")
        desc = ExperimentConfig.model_fields[section].default_factory.model_fields[name].description or key  # type: ignore[union-attr]
        text = desc[:1].upper() + desc[1:]
    builtin, schema = (show_value(v) for v in key_defaults(key))
    default = builtin if builtin == schema else f"{builtin} without --config, {schema} when a config omits it"
    return f"{text.rstrip('.')} ({key}; default {default})."


def echo_err(msg: str) -> None:
    typer.echo(msg, err=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def handle_errors() -> Iterator[None]:
    """Turn IIAError into ``error: <message>`` on stderr and its exit code (2 config, 1 runtime)."""
    try:
        yield
    except IIAError as exc:
        echo_err(f"error: {one_line(str(exc))}")
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
    except OSError as exc:  # a write refused by the system after the up-front checks (disk full, ...)
        where = f": {exc.filename}" if exc.filename else ""
        echo_err(f"error: {one_line(exc.strerror or str(exc))}{where}")
        raise typer.Exit(1) from None
    finally:
        sys.stdout.flush()


def usage_message(exc: Exception, args: Sequence[str], prog: str = "iia", commands: Sequence[str] = ()) -> str:
    """One line for a Typer/Click usage error: the command, what is wrong, and where to look."""
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:
        command = ctx.command_path
    else:  # errors raised while parsing options carry no context
        command = f"{prog} {args[0]}" if args and args[0] in commands else prog
    fmt = getattr(exc, "format_message", None)
    msg = one_line(fmt() if callable(fmt) else str(exc)).rstrip(".")
    if "unexpected extra argument" in msg:
        extra = [a for a in args if a.lower() in BOOL_WORDS]
        flag = next((args[i - 1] for i, a in enumerate(args) if i and a in extra and args[i - 1].startswith("--")),
                    None)
        if flag:
            msg += f"; {flag} is a flag and takes no value: write {flag} alone"
    return f"error: {command}: {msg}; see '{command} --help'"


class OneLineErrorGroup(TyperGroup):
    """The ``iia`` command group: usage errors (unknown option, missing or extra argument, a value of the
    wrong type) print one line ``error: ...`` and exit 2 instead of Typer's multi-line box; an unexpected
    exception prints one line and exits 1 (``IIA_DEBUG=1`` shows its traceback)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # Typer's bundled Click errors derive from TyperException
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `iia`: the help, as Click prints it
                echo_err(exc.format_message())
            else:
                echo_err(usage_message(exc, argv, prog_name or "iia", list(self.commands)))
            rv = getattr(exc, "exit_code", 2)
        except typer.Abort:
            echo_err("error: aborted")
            rv = 1
        except Exception as exc:  # a bug: one line, not a traceback, unless asked for
            if os.environ.get("IIA_DEBUG"):
                raise
            tb = traceback.extract_tb(exc.__traceback__)
            where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
            echo_err(f"error: internal error{where}: {type(exc).__name__}: {one_line(str(exc))} "
                     f"(rerun with IIA_DEBUG=1 for the traceback, and please report it)")
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def command_config(config: Optional[Path], sets: Optional[list[str]], extra: dict[str, Any],
                   shard: Optional[str] = None) -> ExperimentConfig:
    """The config a command runs: ``config`` (or the built-in default) with ``extra`` (its options) and ``sets``
    (``--set KEY=VALUE``) applied; checks the environment knobs and sets up torchrun ranks / ``--shard`` first."""
    envvars.check()  # IIA_CHECKPOINT_EVERY_S, IIA_PROGRESS_EVERY_S, torchrun's: a bad value fails before any work
    dist.setup(shard)  # torchrun ranks (RANK, WORLD_SIZE) and --shard
    overrides = [(k, v) for k, v in extra.items() if v is not None] + parse_set(sets)
    if config is not None:
        return load_config(config, overrides)
    log("no --config: using the built-in default (configs/mnist-testbed.yaml: the trained testbed network builtin:mnist-ddpm)")
    cfg = load_config(DEFAULT_CONFIG, overrides)  # the same file as configs/mnist-testbed.yaml
    cfg.source = None  # suggestions name no internal path
    return cfg
