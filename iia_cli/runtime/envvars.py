"""The environment variables that tune a run, parsed and checked in one place.

A bad value is a one-line :class:`~iia_cli.runtime.errors.ConfigError` (exit 2) that names the variable and what would
be valid, never a traceback or a silent fallback. The CLI checks them all before a command starts (:func:`check`),
and the code that uses one reads it once per run, before its loop.

Not here: ``IIA_CACHE_DIR`` (a path, ``layout.model_cache_dir``), ``IIA_INCEPTION_WEIGHTS`` and
``IIA_CLIP_WEIGHTS`` (paths checked where the file is needed) and ``IIA_DEBUG`` (any non-empty value).
"""

from __future__ import annotations

import math
import os

from .errors import ConfigError

CHECKPOINT_EVERY_S = "IIA_CHECKPOINT_EVERY_S"  # seconds between partial-progress checkpoints
PROGRESS_EVERY_S = "IIA_PROGRESS_EVERY_S"  # seconds between plain progress lines
# Progress lines every 20 s: a line is due when the interval has passed and comes at the end of the step or batch
# in flight, so a 30 s interval left stretches of 30.6 s in the README run; 20 s keeps every stretch under 30 s.
DEFAULT_SECONDS = {CHECKPOINT_EVERY_S: 30.0, PROGRESS_EVERY_S: 20.0}
TORCHRUN_INTS = {"WORLD_SIZE": (1, 1), "RANK": (0, 0), "LOCAL_RANK": (0, 0)}  # name: (default, minimum)


def seconds(name: str) -> float:
    """A non-negative number of seconds from ``$name`` (unset or empty: its default)."""
    default = DEFAULT_SECONDS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"environment variable {name}={raw!r} is not valid; set it to a number of seconds >= 0 "
                          f"(default {default:g}) or unset it")
    return value


def integer(name: str) -> int:
    """One of torchrun's integers (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``; unset or empty: its default)."""
    default, minimum = TORCHRUN_INTS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} is not valid; it must be an integer >= {minimum} "
                          f"(torchrun sets it; unset it for a single process)")
    return value


def checkpoint_every_s() -> float:
    return seconds(CHECKPOINT_EVERY_S)


def progress_every_s() -> float:
    return seconds(PROGRESS_EVERY_S)


def check() -> None:
    """Raise ConfigError for the first variable with a bad value (the CLI calls this before any work)."""
    for name in DEFAULT_SECONDS:
        seconds(name)
    for name in TORCHRUN_INTS:
        integer(name)
    world, rank = integer("WORLD_SIZE"), integer("RANK")
    if rank >= world:
        raise ConfigError(f"environment variable RANK={os.environ['RANK'].strip()!r} is not valid with "
                          f"WORLD_SIZE={world}; it must be "
                          f"0..{world - 1} (torchrun sets both; unset them for a single process)")
