"""EDM network pickles (``network-snapshot-*.pkl``, ``edm-cifar10-32x32-cond-vp.pkl``, ...) as denoisers.

EDM (Karras et al. 2022) stores each network class's *source code* inside the pickle: a persistent object
pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` is a dict with
``type='class'``, ``version``, ``module_src`` (the whole source file defining the class), ``class_name`` and
``state`` (the object's ``__dict__``). This module is a clean-room reader of that format, written from the
format description alone (EDM's code is CC BY-NC-SA and none of it is used here):

* a ``pickle.Unpickler`` whose ``find_class`` maps that one hook to :func:`_reconstruct` below, which execs
  ``module_src`` into a fresh module (one per distinct source per load, so classes from one file are shared),
  then builds the object with ``cls.__new__(cls)`` and ``__setstate__(state)`` (or ``__dict__.update``);
* the fresh module sees stand-in ``torch_utils`` / ``torch_utils.persistence`` / ``torch_utils.misc`` and
  ``dnnlib`` modules through its own ``__import__``: ``persistent_class`` is the identity decorator. The
  stand-ins are never put into ``sys.modules``, so nothing leaks into the interpreter, and an installed copy
  of EDM's ``torch_utils`` is never imported or shadowed;
* an object whose source cannot be executed (say, a training-only augmentation pipe importing a helper we do
  not provide) loads as a placeholder; selecting it, or a network containing it, raises
  :class:`~iia_cli.errors.IIARuntimeError` with the reason;
* tensor storages saved on a GPU are mapped to the CPU, then the network is moved to ``device``.

Unpickling executes arbitrary code from the file: load only pickles you trust.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import pickle
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from iia_cli.errors import ConfigError, IIARuntimeError, MissingFileError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

_CHUNK = 1 << 20  # 1 MiB
_PERSISTENCE_HOOK = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_STANDIN_ROOTS = ("torch_utils", "dnnlib")
_REQUIRED_ATTRS = ("img_resolution", "img_channels", "sigma_min", "sigma_max")


# --------------------------------------------------------------------------------------------------
# Small shared helpers (also used by the diffusers adapter).


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` (or the torch dtype itself) -> ``torch.dtype``."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if isinstance(name, str) and name in DTYPES:
        return DTYPES[name]
    raise ConfigError(f"unknown model dtype {name!r}; valid: {', '.join(DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def describe_error(err: BaseException, limit: int = 400) -> str:
    """``"Type: message"`` on one line (whitespace collapsed, cut to ``limit`` characters): foreign libraries
    raise multi-line messages (e.g. a state-dict size mismatch per parameter) and CLI errors are one line."""
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# Stand-ins for the helper packages EDM sources import.


class _AttrDict(dict):
    """A dict with attribute access: stands in for ``dnnlib.EasyDict`` values found in pickles."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]


class _Unavailable:
    """Placeholder for a pickled object this loader cannot rebuild; ``reason`` says why."""

    reason = "unavailable"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise IIARuntimeError(f"object from the pickle could not be rebuilt: {self.reason}")

    def __repr__(self) -> str:
        return f"<unavailable: {self.reason}>"


def _unavailable(reason: str) -> type[_Unavailable]:
    return type("Unavailable", (_Unavailable,), {"reason": reason})


def _missing_attr(module_name: str) -> Callable[[str], Any]:
    def __getattr__(name: str) -> Any:
        raise AttributeError(f"{module_name}.{name} is not provided by iia_cli's clean-room EDM pickle loader")

    return __getattr__


def _constant(
    value: Any,
    shape: Any = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    memory_format: torch.memory_format | None = None,
) -> torch.Tensor:
    """A constant tensor of ``value``, broadcast to ``shape`` if given."""
    tensor = torch.as_tensor(np.array(value) if isinstance(value, np.ndarray) else value, dtype=dtype, device=device)
    if shape is not None:
        tensor = tensor.broadcast_to(shape)
    if memory_format is not None:
        tensor = tensor.contiguous(memory_format=memory_format)
    return tensor


def _const_like(ref: torch.Tensor, value: Any, shape: Any = None, dtype: torch.dtype | None = None,
                device: Any = None, memory_format: torch.memory_format | None = None) -> torch.Tensor:
    """``_constant`` defaulting to ``ref``'s dtype and device."""
    return _constant(value, shape, dtype or ref.dtype, device or ref.device, memory_format)


def _standin(name: str, package: bool = False, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs, __getattr__=_missing_attr(name))
    if package:
        module.__path__ = []  # a package, so ``import torch_utils.persistence`` parses
    return module


def _make_standins() -> dict[str, types.ModuleType]:
    """Fresh stand-in modules, visible only to the sources executed by one load."""
    identity = lambda cls: cls  # noqa: E731  (``persistent_class``: classes stay plain torch modules)
    persistence = _standin("torch_utils.persistence", persistent_class=identity,
                           is_persistent=lambda obj: False, import_hook=identity)
    misc = _standin("torch_utils.misc", constant=_constant, const_like=_const_like)
    torch_utils = _standin("torch_utils", package=True, persistence=persistence, misc=misc)
    util = _standin("dnnlib.util", EasyDict=_AttrDict)
    dnnlib = _standin("dnnlib", package=True, util=util, EasyDict=_AttrDict)
    return {m.__name__: m for m in (torch_utils, persistence, misc, dnnlib, util)}


def _make_import(standins: Mapping[str, types.ModuleType]) -> Callable[..., Any]:
    """An ``__import__`` that serves ``torch_utils*`` / ``dnnlib*`` from ``standins``, else the real one."""

    def _import(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and name.split(".")[0] in _STANDIN_ROOTS:
            if name not in standins:
                raise ImportError(f"{name} is not provided by iia_cli's clean-room EDM pickle loader")
            return standins[name] if fromlist else standins[name.split(".")[0]]
        return builtins.__import__(name, globals, locals, fromlist, level)

    return _import


# --------------------------------------------------------------------------------------------------
# The unpickler.


class _EDMUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds EDM persistent objects from their embedded source (see module doc)."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._standins = _make_standins()
        self._builtins = dict(builtins.__dict__, __import__=_make_import(self._standins))
        self._modules: dict[str, types.ModuleType | Exception] = {}  # module_src -> module or exec error

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == _PERSISTENCE_HOOK:
            return self._reconstruct
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_to_cpu
        if module.split(".")[0] in _STANDIN_ROOTS:
            if name == "EasyDict" and module in ("dnnlib", "dnnlib.util"):
                return _AttrDict
            return _unavailable(f"{module}.{name} is not provided by the clean-room loader")
        return super().find_class(module, name)

    def _module_for(self, module_src: str) -> types.ModuleType:
        if module_src not in self._modules:
            digest = hashlib.sha256(module_src.encode()).hexdigest()[:16]
            module = types.ModuleType(f"_iia_edm_src_{digest}")
            module.__dict__["__builtins__"] = self._builtins
            try:
                exec(compile(module_src, f"<edm pickle source {digest}>", "exec"), module.__dict__)
            except Exception as err:  # any failure of foreign code: remember it, placeholder below
                self._modules[module_src] = err
            else:
                self._modules[module_src] = module
        found = self._modules[module_src]
        if isinstance(found, Exception):
            raise found
        return found

    def _reconstruct(self, meta: Mapping[str, Any]) -> Any:
        """``_reconstruct_persistent_obj(meta)``: exec ``module_src``, ``cls.__new__``, ``__setstate__``."""
        class_name = str(meta.get("class_name", "?"))
        if meta.get("type") != "class":
            return _unavailable(f"persistent object of unknown type {meta.get('type')!r}")()
        try:
            cls = getattr(self._module_for(meta["module_src"]), class_name)
        except Exception as err:
            return _unavailable(f"class {class_name}: {describe_error(err)}")()
        obj = cls.__new__(cls)
        state = dict(meta.get("state") or {})
        setstate = getattr(obj, "__setstate__", None)
        if callable(setstate):
            setstate(state)
        else:
            obj.__dict__.update(state)
        return obj


def _load_storage_to_cpu(data: bytes) -> Any:
    """``torch.storage._load_from_bytes``, mapping storages saved on a GPU to the CPU."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _find_unavailable(root: Any) -> _Unavailable | None:
    """The first placeholder reachable from ``root`` through containers and instance ``__dict__``s."""
    skip = (torch.Tensor, str, bytes, int, float, type(None), type, types.ModuleType, types.FunctionType)
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, _Unavailable):
            return obj
        if isinstance(obj, Mapping):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        else:
            stack.extend(getattr(obj, "__dict__", {}).values())
    return None


# --------------------------------------------------------------------------------------------------
# The adapter.


class EDMPickleDenoiser:
    """An EDM network (``*Precond``) as a :class:`~iia_cli.models.base.Denoiser`.

    EDM networks already are ``D(x; sigma)`` (Karras et al. 2022, eq. 7: ``D = c_skip x + c_out F(c_in x,
    c_noise)``), take ``sigma`` of shape [B] and one-hot ``class_labels`` [B, label_dim].

    Precision (``dtype``): ``float32`` calls the network as stored. ``float16`` sets the network's own
    ``use_fp16`` flag when it has one (EDM's mixed-precision path: float32 weights and skip connection,
    float16 activations inside the U-Net; EDM enables it on CUDA only, so on the CPU it computes in float32),
    and otherwise runs the call under ``torch.autocast``. ``bfloat16`` always uses ``torch.autocast``. The
    input is handed to the network in float32 either way, because EDM's ``c_skip * x`` term needs it.
    """

    def __init__(self, net: Any, *, path: Path, key: str, dtype: torch.dtype, file_sha256: str,
                 device: torch.device) -> None:
        self.net = net
        self.path = path
        self.key = key
        self.dtype = dtype
        self.device = device
        self._file_sha256 = file_sha256
        self.shape: tuple[int, int, int] = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
        self.sigma_min = float(net.sigma_min)
        self.sigma_max = float(net.sigma_max)
        self.label_dim = int(getattr(net, "label_dim", 0) or 0)
        self._autocast = dtype != torch.float32 and not (dtype == torch.float16 and hasattr(net, "use_fp16"))

    def __call__(
        self, x: torch.Tensor, sigma: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``D(x; sigma)``: x [B, C, H, W], sigma [B] (or a scalar), class_labels one-hot [B, label_dim]."""
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1).expand(x.shape[0])
        labels = None
        if self.label_dim and class_labels is not None:
            labels = class_labels.to(device=x.device, dtype=torch.float32)
        if self._autocast:
            with torch.autocast(device_type=x.device.type, dtype=self.dtype):
                denoised = self.net(x.to(torch.float32), sigma, labels)
        else:
            denoised = self.net(x.to(torch.float32), sigma, labels)
        return denoised.to(x.dtype)

    def round_sigma(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The network's own ``round_sigma`` (identity for EDM/VP/VE preconditioners)."""
        round_sigma = getattr(self.net, "round_sigma", None)
        return round_sigma(sigma) if callable(round_sigma) else torch.as_tensor(sigma)

    def fingerprint(self) -> str:
        """sha256 over (sha256 of the pickle's bytes, key, dtype)."""
        text = "\0".join(("edm-pkl", self._file_sha256, self.key, dtype_name(self.dtype)))
        return hashlib.sha256(text.encode()).hexdigest()


def load_edm_pickle(
    path: str | Path, key: str = "ema", dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"
) -> EDMPickleDenoiser:
    """Load ``pickle.load(path)[key]`` from an EDM pickle with the clean-room unpickler (module doc).

    Executes the code stored in the pickle: use trusted files only.
    Raises MissingFileError for a missing file, IIARuntimeError for an unreadable pickle, a missing key
    (naming the keys present) or an object that is not an EDM network; ConfigError for a bad dtype.
    """
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    if not path.is_file():
        raise MissingFileError("EDM network pickle", path)
    file_sha256 = sha256_file(path)
    try:
        with open(path, "rb") as f:
            data = _EDMUnpickler(f).load()
    except Exception as err:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise IIARuntimeError(f"cannot unpickle {path}: {describe_error(err)}") from err
    if not isinstance(data, Mapping):
        raise IIARuntimeError(f"{path} holds a {type(data).__name__}, expected a dict with key {key!r}")
    if key not in data:
        raise IIARuntimeError(f"{path} has no key {key!r}; keys present: {', '.join(map(repr, data))}")
    net: Any = data[key]
    if (bad := _find_unavailable(net)) is not None:
        raise IIARuntimeError(f"{path}[{key!r}] could not be rebuilt: {bad.reason}")
    missing = [a for a in _REQUIRED_ATTRS if not hasattr(net, a)]
    if not isinstance(net, torch.nn.Module) or missing:
        raise IIARuntimeError(
            f"{path}[{key!r}] is a {type(net).__name__}, not an EDM network"
            + (f" (missing attributes: {', '.join(missing)})" if missing else "")
        )
    device = torch.device(device)
    net = net.eval().requires_grad_(False).to(device)
    if torch_dtype == torch.float16 and hasattr(net, "use_fp16"):
        net.use_fp16 = True
    return EDMPickleDenoiser(net, path=path, key=key, dtype=torch_dtype, file_sha256=file_sha256, device=device)
