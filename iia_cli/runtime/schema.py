"""Building blocks of the config schema (pydantic v2): YAML-friendly scalars and our one-line errors.

YAML and ``--set a.b=c`` give loosely typed values; these annotated types accept what a config writer means
and nothing more: an int is an int or an integral number or string (never a bool, never 2.5), a bool is a
bool or one of true/false/yes/no/1/0, a list may be written ``5,9`` or ``[5, 9]``. A bad value raises a pydantic
error that :func:`config_error` turns into one line: ``key=value is not a valid int``. Checks that know their
key and valid choices raise :class:`~iia_cli.runtime.errors.ConfigError` directly (pydantic lets it through).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from .errors import ConfigError

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
NETWORK_DTYPES = ("float32", "float16", "bfloat16")  # model.dtype / sampler.dtype of network kinds


def bad_value(key: str, value: Any, expected: str) -> str:
    return f"{key}={value!r:.80} is not a valid {expected}"


def _invalid(value: Any, expected: str) -> PydanticCustomError:
    return PydanticCustomError("iia_type", "not a valid {expected}", {"expected": expected, "value": value})


def to_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _invalid(value, "int")
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(value, "int") from None


def to_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(value, "float") from None


def to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    word = str(value).lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise _invalid(value, "bool")


def to_str(value: Any) -> str:
    if value is None or isinstance(value, (dict, list)):
        raise _invalid(value, "str")
    return str(value)


def _optional(convert: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else convert(value)


def _list_of(convert: Callable[[Any], Any], sep: str = ",") -> Callable[[Any], list[Any]]:
    """A list, or a string of items separated by ``sep`` (``5,9`` or ``ddim,iia-ddim`` is a list of two; one
    item is a list of one): every list key takes ``a,b`` as well as ``[a, b]``, in a file and in ``--set``."""
    def to_list(value: Any) -> list[Any]:
        if isinstance(value, str):
            return [convert(v.strip()) for v in value.split(sep) if v.strip()]
        return [convert(v) for v in (value if isinstance(value, list) else [value])]
    return to_list


def _required(value: Any) -> Any:
    if value in (None, ""):
        raise PydanticCustomError("missing", "required")
    return value


def _choice(values: Sequence[str], optional: bool = False) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        text = value if isinstance(value, str) else str(value)
        if text not in values:
            raise PydanticCustomError("iia_choice", "not valid", {"value": text, "choices": ", ".join(values)})
        return text
    return check


def batch_value(value: Any) -> int | str:
    """``sampler.batch``: an int, or a word (``auto``) that the sampler section checks."""
    try:
        return to_int(value)
    except PydanticCustomError:
        return to_str(value)


Int = Annotated[int, BeforeValidator(to_int)]
Float = Annotated[float, BeforeValidator(to_float)]
Bool = Annotated[bool, BeforeValidator(to_bool)]
Str = Annotated[str, BeforeValidator(to_str)]
OptInt = Annotated[int | None, BeforeValidator(_optional(to_int))]
OptFloat = Annotated[float | None, BeforeValidator(_optional(to_float))]
OptStr = Annotated[str | None, BeforeValidator(_optional(to_str))]
IntList = Annotated[list[int], BeforeValidator(_list_of(to_int))]
OptFloatList = Annotated[list[float] | None, BeforeValidator(_optional(_list_of(to_float)))]
OptStrList = Annotated[list[str] | None, BeforeValidator(_optional(_list_of(to_str)))]
StrList = Annotated[list[str], BeforeValidator(_list_of(to_str))]
# seed specs contain commas (0,5,10-19), so a string of several is separated by ';' (like --seed-ranges)
OptSeedSpecList = Annotated[list[str] | None, BeforeValidator(_optional(_list_of(to_str, sep=";")))]
RequiredStr = Annotated[str, BeforeValidator(lambda v: to_str(_required(v)))]
RequiredAny = Annotated[Any, BeforeValidator(_required)]
Batch = Annotated[int | str, BeforeValidator(batch_value)]


def Choice(*values: str) -> Any:
    """A string from a fixed set (``Literal`` in the schema; our message when it is not one of them)."""
    return Annotated[Literal[values], BeforeValidator(_choice(values))]


def OptChoice(*values: str) -> Any:
    return Annotated[Literal[values] | None, BeforeValidator(_choice(values, optional=True))]


def parse_int_list(value: Any, key: str) -> list[int]:
    """``5,9`` / ``[5, 9]`` / ``5`` -> a list of ints, for options outside the config (``--nfe``)."""
    try:
        return _list_of(to_int)(value)
    except PydanticCustomError as exc:
        raise ConfigError(bad_value(key, exc.context["value"], exc.context["expected"])) from None


class Section(BaseModel):
    """A config section: a mapping (or empty) whose keys are the fields; an unknown key is an error."""

    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str] = ""

    @classmethod
    def unknown_key(cls, key: str) -> str:
        return f"unknown key {cls.section}.{key}; valid keys in {cls.section}: {', '.join(cls.model_fields)}"

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, data: Any) -> Any:
        if data is None:
            return {}
        if not isinstance(data, dict):
            if isinstance(data, cls):
                return data
            raise ConfigError(f"config section {cls.section!r} must be a mapping, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(cls.model_fields))
        if unknown:
            raise ConfigError(cls.unknown_key(unknown[0]))
        return data


class ModelParams(Section):
    """The ``model`` section of one model kind: ``kind`` and the kind's own keys (a subclass per kind, next to
    its loader; the registry in :mod:`iia_cli.models.registry` lists them)."""

    section: ClassVar[str] = "model"
    kind: str

    @classmethod
    def kind_name(cls) -> str:
        return cls.model_fields["kind"].default

    @classmethod
    def unknown_key(cls, key: str) -> str:
        return f"unknown key model.{key} for model.kind={cls.kind_name()}; valid keys: {', '.join(cls.model_fields)}"

    @property
    def params(self) -> dict[str, Any]:
        """The settings the loader gets and the fingerprint hashes: every key with a default, and keys without one
        (None) only where the config gives them -- the same dict the project always hashed."""
        return {k: getattr(self, k) for k in type(self).model_fields
                if k != "kind" and (getattr(self, k) is not None or k in self.model_fields_set)}


def config_error(exc: ValidationError, prefix: tuple[str, ...] = ()) -> ConfigError:
    """The first error of a pydantic ValidationError as our one line (dotted key, bad value, what is valid)."""
    err = exc.errors(include_url=False)[0]
    loc = [*prefix, *(str(p) for p in err["loc"] if not isinstance(p, int))]
    kind = None
    if loc[:1] == ["model"] and len(loc) > 2:  # the discriminated union puts the kind into the location
        kind = loc.pop(1)
    key = ".".join(loc)
    ctx = err.get("ctx") or {}
    if err["type"] == "iia_type":
        return ConfigError(bad_value(key, ctx["value"], ctx["expected"]))
    if err["type"] == "iia_choice":
        return ConfigError(f"{key}={ctx['value']!r} is not valid; choose one of {ctx['choices']}")
    if err["type"] == "missing":
        return ConfigError(f"{key} is required" + (f" for model.kind={kind}" if kind else ""))
    if err["type"] in ("dict_type", "model_type"):
        return ConfigError(f"{key}={err['input']!r:.80} must be a mapping")
    return ConfigError(f"{key}={err['input']!r:.80} is not valid: {err['msg']}")
