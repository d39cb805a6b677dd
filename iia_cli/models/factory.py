"""The ``python`` model kind: a user factory ``package.module:function`` or ``path/to/file.py:function``.

The function is called with the config's ``kwargs`` and returns an object with
``__call__(x, sigma, class_labels=None)`` (sigma a tensor of shape [B]), ``shape``, ``sigma_min``,
``sigma_max`` and optionally ``label_dim``. This is the escape hatch for any other model.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, IIARuntimeError, MissingFileError

REQUIRED_ATTRS = ("shape", "sigma_min", "sigma_max")


def _load_function(spec: str) -> tuple[Any, Path | None]:
    if ":" not in spec:
        raise ConfigError(f"model.factory={spec!r} must be 'package.module:function' or 'path/to/file.py:function'")
    target, func_name = spec.rsplit(":", 1)
    source: Path | None = None
    if target.endswith(".py") or "/" in target or "\\" in target:
        source = Path(target).expanduser()
        if not source.is_file():
            raise MissingFileError("model factory file", source)
        mod_name = f"iia_user_factory_{hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:12]}"
        mod_spec = importlib.util.spec_from_file_location(mod_name, source)
        if mod_spec is None or mod_spec.loader is None:
            raise IIARuntimeError(f"cannot import model factory file {source}")
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[mod_name] = module
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:
            raise IIARuntimeError(f"importing model factory {source} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"model.factory module {target!r} cannot be imported ({exc})") from None
        source = Path(module.__file__) if getattr(module, "__file__", None) else None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"model.factory: {target!r} has no function {func_name!r}")
    return func, source


def load_factory_model(factory: str, kwargs: dict[str, Any] | None = None) -> Any:
    func, source = _load_function(factory)
    try:
        model = func(**(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(f"model.kwargs do not fit {factory}: {exc}") from None
    missing = [a for a in REQUIRED_ATTRS if not hasattr(model, a)]
    if missing or not callable(model):
        what = ", ".join(missing) if missing else "__call__"
        raise IIARuntimeError(f"model factory {factory} returned an object without {what}")
    h = hashlib.sha256()
    h.update(factory.encode())
    h.update(json.dumps(kwargs or {}, sort_keys=True, default=str).encode())
    if source is not None and source.is_file():
        h.update(source.read_bytes())
    if callable(getattr(model, "fingerprint", None)):
        h.update(str(model.fingerprint()).encode())
    model_fp = h.hexdigest()
    try:
        model._iia_fingerprint = model_fp
    except AttributeError:
        pass
    return model
