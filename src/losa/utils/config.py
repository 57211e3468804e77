"""The one validated base of every losa config (pruning, LoSA, fine-tuning, adapters, pruner options).

Every config derives from :class:`LosaConfig`: unknown keys are rejected, assignments are validated,
and every field carries a description, which :mod:`losa.cli.flags` turns into a command-line flag.
A validation error has one path to the user: :func:`build_config` raises a :class:`LosaError` whose
message is one line (``invalid config: field: message``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from losa.errors import LosaError

C = TypeVar("C", bound=BaseModel)

#: ``json_schema_extra`` key of a field whose command-line flags are the registered pruners' options
PRUNER_OPTIONS = "pruner_options"


class LosaConfig(BaseModel):
    """Base of every losa config: ``extra="forbid"`` (a misspelt key is an error, not ignored) and
    validated assignment. Constructing a subclass directly or assigning a field an invalid value (or a name that is
    no field) raises :class:`LosaError` with one line; the config keeps its earlier value."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise LosaError(validation_message(e, type(self))) from None

    def __setattr__(self, name: str, value: Any) -> None:
        # assignments are validated too (validate_assignment): the same one-line LosaError as construction
        if name not in type(self).model_fields and not name.startswith("_"):
            raise LosaError(f"invalid config: {name}: {_unknown(type(self), (name,))}")
        before, fields_set = self.__dict__.get(name), set(self.__pydantic_fields_set__)
        try:
            super().__setattr__(name, value)
        except (ValidationError, LosaError) as e:
            # a check across fields (a model validator) runs after the value is stored: put the old one back
            self.__dict__[name] = before
            object.__setattr__(self, "__pydantic_fields_set__", fields_set)
            raise (LosaError(validation_message(e, type(self))) if isinstance(e, ValidationError) else e) from None

    def non_default_fields(self) -> set[str]:
        """Fields given a value other than their default (a recipe that lists defaults sets nothing).

        Returns:
            The names among ``model_fields_set`` whose value differs from the field's default.
        """
        return {f for f in self.model_fields_set
                if getattr(self, f) != type(self).model_fields[f].get_default(call_default_factory=True)}


#: pydantic's number-bound error types: (its context key, what the value must be)
_BOUNDS = {"greater_than_equal": ("ge", "must be at least"), "greater_than": ("gt", "must be greater than"),
           "less_than_equal": ("le", "must be at most"), "less_than": ("lt", "must be less than")}


def _num(v: Any) -> Any:
    return f"{v:.12g}" if isinstance(v, float) else v  # -1.0 as -1; never rounded onto the bound


def _unknown(cls: type[BaseModel] | None, loc: tuple) -> str:
    """The message for a key that is no field: of which config, and the field meant where one is close (a
    misspelling, or a field of a nested config: ``lr`` -> ``finetune.lr``)."""
    import difflib

    model = cls
    for part in loc[:-1]:  # the nested config the key was given to
        ann = getattr(model.model_fields.get(str(part)), "annotation", None) if model is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if model is None:
        return "unknown option; check the spelling (see --help for the valid names)"
    key = str(loc[-1])
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.7)
    nested = [f"{n}.{key}" for n, f in model.model_fields.items()
              if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel) and key in f.annotation.model_fields]
    guess = close[0] if close else (nested[0] if nested else None)
    hint = f"did you mean {guess!r}?" if guess else f"check the spelling (help({model.__name__}) or --help lists them)"
    holder = next((n for n, f in model.model_fields.items() if (f.json_schema_extra or {}).get(PRUNER_OPTIONS)), None)
    if holder is not None and guess is None:  # a pruner's own option given beside the method (YAML: blocksize: 64)
        from losa.pruning.base import pruner_classes

        owners = [n for n, c in pruner_classes().items() if key in c.Options.model_fields]
        if owners:
            hint = f"it is an option of {' / '.join(owners)}: give it under {holder!r} ({holder}: {{{key}: …}})"
    return f"unknown option of {model.__name__}; {hint}"


def validation_message(err: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """A pydantic error as one line: ``invalid config: field: message; …`` (no field for a check across fields).

    Args:
        err: the pydantic validation error.
        cls: the config class validated (names the config of an unknown key and suggests the field meant).
    Returns:
        the message, prefixed ``invalid config:``.
    """
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = str(e["msg"]).removeprefix("Value error, ")
        bound = _BOUNDS.get(e.get("type", ""))
        if e.get("type") == "extra_forbidden":
            msg = _unknown(cls, tuple(e["loc"]))
        elif bound is not None and bound[0] in e.get("ctx", {}):  # pydantic's "Input should be ..." in plain words
            msg = f"{_num(e.get('input'))} {bound[1]} {_num(e['ctx'][bound[0]])}"
        parts.append(f"{loc}: {msg}" if loc else msg)  # a check across fields names its fields itself
    return "invalid config: " + "; ".join(parts)


def build_config(cls: type[C], values: dict[str, Any] | C | None = None) -> C:
    """Instantiate ``cls`` from a mapping (or pass an instance through).

    Args:
        cls: a :class:`LosaConfig` subclass.
        values: field values (nested configs as mappings), an instance of ``cls``, or None for defaults.
    Returns:
        the validated config.
    Raises:
        LosaError: one line naming every invalid field.
    """
    if isinstance(values, cls):
        return values
    try:
        return cls(**(values or {}))
    except ValidationError as e:
        raise LosaError(validation_message(e, cls)) from None


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML recipe (a mapping of config fields; nested configs as nested mappings).

    Raises:
        LosaError: the file is missing, is not YAML, or is not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise LosaError(f"recipe file {p} not found; check the path")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LosaError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LosaError(f"recipe {p} must be a mapping of config fields")
    return data
