"""EDM network pickles (``network-snapshot-*.pkl``, ``edm-cifar10-32x32-cond-vp.pkl``, ...) as denoisers.

EDM (Karras et al. 2022) stores each network class's *source code* inside the pickle: a persistent object
pickles as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` is a dict with
``type='class'``, ``version``, ``module_src`` (the whole source file defining the class), ``class_name`` and
``state`` (the object's ``__dict__``). This module is a clean-room reader of that format, written from the
format description alone (EDM's code is CC BY-NC-SA and none of it is used here):

* a ``pickle.Unpickler`` whose ``find_class`` is an allow-list: the persistence hook (mapped to
  :func:`_reconstruct` below), torch's tensor/parameter rebuild functions, tensor storages (read back by
  ``torch.load(weights_only=True)``), ``torch.nn`` module classes, ``collections.OrderedDict``, numpy
  scalar/array/dtype reconstruction and ``dnnlib.EasyDict``. Any other global (``os.system``,
  ``builtins.eval``, ``subprocess.Popen``, ``torch.load``, ...) stops the load with an error naming it, before
  anything is called;
* the hook executes ``module_src`` only when its sha256 is one of :data:`KNOWN_EDM_SOURCES` (the persistent
  source files of NVlabs/edm at every public revision) or when the caller passes ``trust_code=True``
  (config ``model.trust_code: true``). An object whose source is not trusted is not built: it loads as a
  placeholder, and selecting it (or a network containing it) raises an error saying how to allow it;
* a trusted source runs in a fresh module (one per distinct source per load, so classes from one file are
  shared); only a class defined by that source is instantiated, with ``cls.__new__(cls)`` and
  ``__setstate__(state)`` (or ``__dict__.update``);
* the fresh module sees stand-in ``torch_utils`` / ``torch_utils.persistence`` / ``torch_utils.misc`` and
  ``dnnlib`` modules through its own ``__import__``: ``persistent_class`` is the identity decorator. The
  stand-ins are never put into ``sys.modules``, so nothing leaks into the interpreter, and an installed copy
  of EDM's ``torch_utils`` is never imported or shadowed;
* an object whose source cannot be executed (say, a training-only augmentation pipe importing a helper we do
  not provide) loads as a placeholder too, with the reason;
* tensor storages saved on a GPU are mapped to the CPU, then the network is moved to ``device``.
"""

from __future__ import annotations

import builtins
import collections
import hashlib
import importlib
import io
import pickle
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from iia_cli.io.hashing import sha256_of_file as sha256_file
from iia_cli.models.shared import dtype_name, parse_dtype
from iia_cli.runtime.errors import ConfigError, IIARuntimeError, MissingFileError, describe_error
from iia_cli.runtime.schema import NETWORK_DTYPES, Bool, Choice, ModelParams, RequiredStr, Str

_PERSISTENCE_HOOK = ("torch_utils.persistence", "_reconstruct_persistent_obj")
_STANDIN_ROOTS = ("torch_utils", "dnnlib")
_REQUIRED_ATTRS = ("img_resolution", "img_channels", "sigma_min", "sigma_max")

# sha256 of the ``module_src`` strings that EDM's persistence embeds (``inspect.getsource`` of the module: the
# file's UTF-8 text with "\n" line ends), for every NVlabs/edm source file that defines persistent classes, at
# each public revision (0a2ff34 initial release, b2a26c9, 62072d2, 008a4e5). Checked against snapshots that
# EDM's own code wrote. Only these sources run without ``trust_code``; their text is not part of iia_cli.
KNOWN_EDM_SOURCES: dict[str, str] = {
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef": "NVlabs/edm training/networks.py @0a2ff34",
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284": "NVlabs/edm training/networks.py @b2a26c9..008a4e5",
    "b26f0937bc72b18cc5f9869c86035ca9b872138cdfae7994237e9733951e4415": "NVlabs/edm training/loss.py @0a2ff34..008a4e5",
    "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5": "NVlabs/edm training/augment.py @0a2ff34..008a4e5",
}
TRUST_HINT = "set model.trust_code: true (or --set model.trust_code=true) to run it, only for a pickle you trust"


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


class RefusedPickle(IIARuntimeError):
    """The pickle names a global outside the allow-list, or holds a storage that is not plain tensor data."""


def _numpy_core() -> Any:
    return getattr(np, "_core", None) or np.core  # numpy 2 moved numpy.core to numpy._core


def _allowed_global(module: str, name: str) -> Any:
    """The object an EDM pickle may reference as ``module.name``, or None (refused).

    EDM snapshots reference torch's tensor/parameter rebuild functions, storages, ``torch.nn`` containers,
    ``collections.OrderedDict`` and numpy scalars/dtypes; the rest here (``torch.Size``, dtypes, devices, numpy
    arrays, sets, slices) are inert data types other torch versions emit. None of them can run code: every
    callable they receive comes through this same allow-list.
    """
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if (module, name) == ("_codecs", "encode"):  # how protocol 2 stores bytes
        return _latin1_bytes
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice", "complex", "bytearray"):
        return getattr(builtins, name)
    if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                                             "_rebuild_parameter", "_rebuild_parameter_with_state"):
        return getattr(torch._utils, name, None)
    if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
        return getattr(torch._tensor, name, None)
    if (module, name) in (("torch._tensor", "Tensor"), ("torch", "Tensor")):
        return torch.Tensor
    if (module, name) == ("torch.nn.parameter", "Parameter"):
        return torch.nn.Parameter
    if module == "torch" and name in ("Size", "device"):
        return getattr(torch, name)
    if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # vars: no lazy imports
        return vars(torch)[name]
    if module.startswith("torch.nn.modules.") and not name.startswith("_"):
        if module in _TORCH_NN_MODULES:
            importlib.import_module(module)  # torch's own submodule: usually imported already
        found = vars(sys.modules[module]).get(name) if module in sys.modules else None
        if isinstance(found, type) and issubclass(found, torch.nn.Module):
            return found
        return None
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        return getattr(_numpy_core().multiarray, name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":  # protocol 5 arrays
        return _numpy_core().numeric._frombuffer
    if module == "numpy" and name in ("dtype", "ndarray"):
        return getattr(np, name)
    if module == "numpy.dtypes":
        found = vars(np.dtypes).get(name)
        return found if isinstance(found, type) and issubclass(found, np.dtype) else None
    return None


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode(text, "latin1")``, which protocol-2 pickles use for bytes; no other codec."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RefusedPickle(f"refused _codecs.encode with encoding {_printable(str(encoding), 40)!r}")
    return text.encode("latin1")


_TORCH_NN_MODULES = frozenset(f"torch.nn.modules.{m}" for m in (
    "activation", "batchnorm", "container", "conv", "dropout", "flatten", "linear", "normalization", "padding",
    "pooling", "sparse", "upsampling", "pixelshuffle", "instancenorm", "module"))


class _EDMUnpickler(pickle.Unpickler):
    """Allow-list unpickler that rebuilds EDM persistent objects from trusted embedded source (module doc)."""

    def __init__(self, file: Any, trust_code: bool = False) -> None:
        super().__init__(file)
        self._trust_code = trust_code
        self._standins = _make_standins()
        self._builtins = dict(builtins.__dict__, __import__=_make_import(self._standins))
        self._modules: dict[str, types.ModuleType | Exception] = {}  # module_src -> module or exec error

    def find_class(self, module: str, name: str) -> Any:
        module, name = str(module), str(name)
        if (module, name) == _PERSISTENCE_HOOK:
            return self._reconstruct
        if module == "torch.storage" and name == "_load_from_bytes":
            return _load_storage_to_cpu
        if module.split(".")[0] in _STANDIN_ROOTS:
            if name == "EasyDict" and module in ("dnnlib", "dnnlib.util"):
                return _AttrDict
            return _unavailable(f"{module}.{name} is not provided by the clean-room loader")
        found = _allowed_global(module, name)
        if found is None:
            raise RefusedPickle(
                f"refused to load global {_printable(module)}.{_printable(name)}: EDM network pickles only "
                "reference tensor rebuild functions, storages, torch.nn modules, collections.OrderedDict, numpy "
                "scalars/dtypes and the persistence hook, so this file is not a plain EDM pickle (it may be malicious)"
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedPickle("refused a persistent id: EDM network pickles have none")

    def _module_for(self, module_src: str) -> types.ModuleType:
        if module_src not in self._modules:
            digest = hashlib.sha256(module_src.encode("utf-8", "surrogatepass")).hexdigest()
            if not self._trust_code and digest not in KNOWN_EDM_SOURCES:
                raise _UntrustedSource(digest)
            module = types.ModuleType(f"_iia_edm_src_{digest[:16]}")
            module.__dict__["__builtins__"] = self._builtins
            try:
                exec(compile(module_src, f"<edm pickle source {digest[:16]}>", "exec"), module.__dict__)
            except Exception as err:  # any failure of foreign code: remember it, placeholder below
                self._modules[module_src] = err
            else:
                self._modules[module_src] = module
        found = self._modules[module_src]
        if isinstance(found, Exception):
            raise found
        return found

    def _reconstruct(self, meta: Mapping[str, Any]) -> Any:
        """``_reconstruct_persistent_obj(meta)``: exec trusted ``module_src``, ``cls.__new__``, ``__setstate__``."""
        if not isinstance(meta, Mapping):
            raise RefusedPickle(f"the persistence hook got a {type(meta).__name__}, not EDM's metadata dict")
        class_name = _printable(str(meta.get("class_name", "?")))
        if meta.get("type") != "class":
            return _unavailable(f"persistent object of unknown type {meta.get('type')!r}")()
        module_src = meta.get("module_src")
        if not isinstance(module_src, str):
            return _unavailable(f"class {class_name}: no module source")()
        try:
            module = self._module_for(module_src)
        except _UntrustedSource as err:
            return _unavailable(
                f"class {class_name}: its embedded Python source (sha256 {err.digest[:16]}...) is not one of the "
                f"known NVlabs/edm source files, so it was not executed; {TRUST_HINT}"
            )()
        except Exception as err:
            return _unavailable(f"class {class_name}: {describe_error(err)}")()
        cls = module.__dict__.get(class_name)
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            return _unavailable(f"class {class_name} is not a class defined by its embedded source")()
        obj = cls.__new__(cls)
        state = dict(meta.get("state") or {})
        setstate = getattr(obj, "__setstate__", None)
        if callable(setstate):
            setstate(state)
        else:
            obj.__dict__.update(state)
        return obj


class _UntrustedSource(Exception):
    def __init__(self, digest: str) -> None:
        super().__init__(digest)
        self.digest = digest


def _printable(text: str, limit: int = 80) -> str:
    """``text`` as one short printable line (names in a hostile pickle can hold anything)."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def _load_storage_to_cpu(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` with torch's weights-only loader (plain tensor data only), mapping
    storages saved on a GPU to the CPU."""
    if not isinstance(data, (bytes, bytearray)):
        raise RefusedPickle(f"a tensor storage holds a {type(data).__name__}, not bytes")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch's refusals are multi-line: keep the line naming the global
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        named = next((line for line in lines if "global" in line.lower()), lines[0] if lines else type(err).__name__)
        raise RefusedPickle(f"refused a tensor storage that is not plain tensor data ({_printable(named, 200)})") from None


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
    path: str | Path, key: str = "ema", dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> EDMPickleDenoiser:
    """Load ``pickle.load(path)[key]`` from an EDM pickle with the clean-room allow-list unpickler (module doc).

    Only the Python source of known NVlabs/edm files embedded in the pickle is executed, unless ``trust_code``
    (then any embedded source runs: use it for pickles you trust only). Globals outside the allow-list are
    refused whatever ``trust_code`` says.
    Raises MissingFileError for a missing file, IIARuntimeError for an unreadable or refused pickle, a missing
    key (naming the keys present), untrusted source or an object that is not an EDM network; ConfigError for a
    bad dtype.
    """
    path = Path(path)
    torch_dtype = parse_dtype(dtype)
    if not isinstance(trust_code, bool):
        raise ConfigError(f"model.trust_code={trust_code!r} must be true or false")
    if not path.is_file():
        raise MissingFileError("EDM network pickle", path)
    file_sha256 = sha256_file(path)
    try:
        with open(path, "rb") as f:
            data = _EDMUnpickler(f, trust_code=trust_code).load()
    except RefusedPickle as err:
        raise RefusedPickle(f"{path}: {err}") from None
    except Exception as err:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
        raise IIARuntimeError(f"cannot unpickle {path}: {describe_error(err)}") from None
    if not isinstance(data, Mapping):
        raise IIARuntimeError(f"{path} holds a {type(data).__name__}, expected a dict with key {key!r}")
    if key not in data:
        present = ", ".join(_printable(repr(k), 40) for k in list(data)[:20])
        raise IIARuntimeError(f"{path} has no key {key!r}; keys present: {present or 'none'}")
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


class EDMPickleParams(ModelParams):
    """``model.kind: edm-pkl``: an EDM network pickle through the allow-list unpickler."""

    kind: Literal["edm-pkl"] = "edm-pkl"
    path: RequiredStr = Field(description="the .pkl file (e.g. edm-cifar10-32x32-cond-vp.pkl)")
    key: Str = Field("ema", description="the pickle's entry holding the network")
    dtype: Choice(*NETWORK_DTYPES) = Field("float32", description="network dtype (sampler.dtype / --dtype overrides)")
    trust_code: Bool = Field(False, description="run embedded source that is not NVlabs/edm's own "
                                                "(trusted pickles only)")


def build(p: EDMPickleParams, device: torch.device) -> EDMPickleDenoiser:
    return load_edm_pickle(p.path, key=p.key, dtype=p.dtype, device=device, trust_code=p.trust_code)
