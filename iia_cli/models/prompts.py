"""Prompt files for text-to-image models: one caption per line, or COCO captions JSON.

Accepted formats (by content, not by file name):

* JSON with COCO's captions layout, ``{"annotations": [{"caption": ...}, ...]}`` (e.g. COCO-2014's
  ``captions_val2014.json``): the captions in file order;
* a JSON list of strings, or of ``{"caption": ...}`` objects;
* plain text: one caption per line; blank lines and lines starting with ``#`` are skipped.

Whitespace inside a caption is collapsed to single spaces (COCO captions carry stray newlines and trailing
blanks). Text-to-image models map seed k to prompt ``k mod P`` ("per-prompt seeds"), so the order of the
file is part of an experiment: seeds 0..N-1 use the first N captions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from iia_cli.runtime.errors import ConfigError, MissingFileError


def _clean(text: str) -> str:
    return " ".join(text.split())


def _from_json(data: Any, path: Path) -> list[str]:
    items = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ConfigError(f"prompts file {path}: JSON must be COCO captions "
                          '({"annotations": [{"caption": ...}]}) or a list of captions')
    out = []
    for k, item in enumerate(items):
        caption = item.get("caption") if isinstance(item, dict) else item
        if not isinstance(caption, str):
            where = f"annotations[{k}]" if isinstance(data, dict) else f"item {k}"
            raise ConfigError(f"prompts file {path}: {where} has no caption string")
        out.append(_clean(caption))
    return out


def load_prompts(path: str | Path) -> list[str]:
    """The captions of a prompts file (module doc), in file order. Raises MissingFileError when the file
    cannot be read and ConfigError when it holds no captions or malformed JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise MissingFileError("prompts file", path, type(err).__name__) from None
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"prompts file {path} is not valid JSON (line {err.lineno}: {err.msg})") from None
        prompts = _from_json(data, path)
    else:
        prompts = [_clean(line) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConfigError(f"prompts file {path} holds no captions; write one caption per line or COCO captions JSON")
    return prompts
