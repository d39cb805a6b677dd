"""The ``python`` model kind: a user factory ``package.module:function`` or ``path/to/file.py:function``.

The function is called with the config's ``kwargs`` and returns an object with
``__call__(x, sigma, class_labels=None)`` (sigma a tensor of shape [B]), ``shape``, ``sigma_min``,
``sigma_max`` and optionally ``label_dim``. This is the escape hatch for any other model.

Naming a factory in the config is the explicit way to run your own code: the module is imported and the
function called as they are. What comes back is checked (shape: three positive sizes; 0 <= sigma_min <
sigma_max; label_dim >= 0), and a failure inside the factory or the model's call becomes a one-line error
naming the factory instead of a traceback.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field

from iia_cli.runtime.errors import ConfigError, IIAError, IIARuntimeError, MissingFileError, describe_error
from iia_cli.runtime.schema import ModelParams, RequiredStr

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
        except (Exception, SystemExit) as exc:
            sys.modules.pop(mod_name, None)
            raise IIARuntimeError(f"importing model factory {source} failed: {describe_error(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"model.factory module {target!r} cannot be imported ({describe_error(exc)})") from None
        except (Exception, SystemExit) as exc:
            raise IIARuntimeError(f"importing model factory module {target!r} failed: {describe_error(exc)}") from None
        source = Path(module.__file__) if getattr(module, "__file__", None) else None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise ConfigError(f"model.factory: {target!r} has no function {func_name!r}")
    return func, source


def _check_model(model: Any, factory: str) -> None:
    """The attributes solvers rely on, checked once: one-line errors instead of tracebacks mid-run."""
    missing = [a for a in REQUIRED_ATTRS if not hasattr(model, a)]
    if missing or not callable(model):
        what = ", ".join(missing) if missing else "__call__"
        raise IIARuntimeError(f"model factory {factory} returned a {type(model).__name__} without {what}; "
                              "return an object with __call__(x, sigma, class_labels=None), shape, sigma_min, sigma_max")
    shape = model.shape
    if (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise IIARuntimeError(f"model factory {factory}: shape={shape!r:.80} must be three positive ints (C, H, W)")
    try:
        lo, hi = float(model.sigma_min), float(model.sigma_max)
    except (TypeError, ValueError):
        raise IIARuntimeError(f"model factory {factory}: sigma_min={model.sigma_min!r:.40} and "
                              f"sigma_max={model.sigma_max!r:.40} must be numbers") from None
    if not 0 <= lo < hi:
        raise IIARuntimeError(f"model factory {factory}: needs 0 <= sigma_min < sigma_max, got {lo} and {hi}")
    n_labels = getattr(model, "label_dim", 0)
    if n_labels is not None and (isinstance(n_labels, bool) or not isinstance(n_labels, int) or n_labels < 0):
        raise IIARuntimeError(f"model factory {factory}: label_dim={n_labels!r:.40} must be an int >= 0")


# Optional model methods iia_cli calls when a model has them (conditioning, decoding, text-to-image captions,
# discrete-time grids, the closed-form teacher): an exception inside one is an error naming the factory.
OPTIONAL_METHODS = ("condition", "decode", "prompt_of", "round_sigma", "sigma_to_t", "t_to_sigma", "exact_solution")


class CheckedModel:
    """A factory's model with its call checked: an exception inside it, or a result that is not a tensor of
    the input's shape, becomes an :class:`IIARuntimeError` naming the factory. Attributes pass through."""

    def __init__(self, model: Any, factory: str) -> None:
        self.__dict__["_model"] = model
        self.__dict__["_factory"] = factory

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        try:
            out = self._model(x, *args, **kwargs)
        except (IIAError, KeyboardInterrupt, MemoryError):
            raise
        except (Exception, SystemExit) as exc:
            raise IIARuntimeError(f"the model of factory {self._factory} failed: {describe_error(exc)}") from None
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = f"a tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise IIARuntimeError(f"the model of factory {self._factory} returned {got}; "
                                  f"expected a tensor of the input's shape {list(x.shape)}")
        return out

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__dict__["_model"], name)
        if name not in OPTIONAL_METHODS or not callable(value):
            return value
        factory = self.__dict__["_factory"]

        def checked(*args: Any, **kwargs: Any) -> Any:
            try:
                return value(*args, **kwargs)
            except (IIAError, KeyboardInterrupt, MemoryError):
                raise
            except (Exception, SystemExit) as exc:
                raise IIARuntimeError(f"the model of factory {factory} failed in {name}(): "
                                      f"{describe_error(exc)}") from None

        return checked

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__[name] = value


def load_factory_model(factory: str, kwargs: dict[str, Any] | None = None) -> Any:
    func, source = _load_function(factory)
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ConfigError(f"model.kwargs must be a mapping of keyword arguments, got {type(kwargs).__name__}")
    try:
        inspect.signature(func).bind(**(kwargs or {}))
    except TypeError as exc:
        raise ConfigError(f"model.kwargs do not fit {factory}: {describe_error(exc)}") from None
    except ValueError:  # no signature to check (a builtin): the call below tells
        pass
    try:
        model = func(**(kwargs or {}))
    except IIAError:
        raise
    except (Exception, SystemExit) as exc:
        raise IIARuntimeError(f"model factory {factory} failed: {describe_error(exc)}") from None
    _check_model(model, factory)
    h = hashlib.sha256()
    h.update(factory.encode())
    h.update(json.dumps(kwargs or {}, sort_keys=True, default=str).encode())
    if source is not None and source.is_file():
        h.update(source.read_bytes())
    if callable(getattr(model, "fingerprint", None)):
        try:
            h.update(str(model.fingerprint()).encode())
        except (Exception, SystemExit) as exc:
            raise IIARuntimeError(f"model factory {factory}: fingerprint() failed: {describe_error(exc)}") from None
    checked = CheckedModel(model, factory)
    checked._iia_fingerprint = h.hexdigest()
    return checked


class FactoryParams(ModelParams):
    """``model.kind: python``: your own model from a factory function (it runs: name only code you trust)."""

    kind: Literal["python"] = "python"
    factory: RequiredStr = Field(description='"pkg.module:function" or "path/to/file.py:function" returning the model')
    kwargs: Any = Field({}, description="keyword arguments of the factory (a mapping)")


def build(p: FactoryParams, device: torch.device) -> Any:
    return load_factory_model(str(p.factory), p.kwargs or {})
