"""Command-line flags generated from config fields, so a config field is one edit and always a flag.

Every field of a :class:`~losa.utils.config.LosaConfig` becomes ``--field-name`` (type, choices and
help from the field; ``--x/--no-x`` for booleans; comma-separated lists). A nested config becomes a
flag group whose flags carry no prefix unless the name is already taken (``finetune.seed`` ->
``--finetune-seed``). Every flag defaults to None, so only what the user typed overrides a YAML recipe.
Pruner options (``PruneConfig.options``) get one group per registered pruner from its ``Options``.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from losa.utils.config import PRUNER_OPTIONS

#: separator of nested field paths inside argparse dests
SEP = "__"


@dataclass(frozen=True)
class Flag:
    """One generated flag: ``path`` is the field path in the config (``("finetune", "lr")``)."""

    option: str
    path: tuple[str, ...]
    dest: str


def _strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007
    return tp


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _list_of(conv: Any) -> Any:
    def parse(text: str) -> list:
        try:
            return [conv(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {conv.__name__}") from None

    parse.__name__ = f"list of {conv.__name__}"
    return parse


def _scalar_or_list(conv: Any) -> Any:
    def parse(text: str) -> Any:
        return _list_of(conv)(text) if "," in text else conv(text)

    parse.__name__ = conv.__name__
    return parse


def _argparse_kwargs(tp: Any, name: str) -> dict[str, Any]:
    """``type``/``choices``/``action``/``metavar`` for a field annotation."""
    kw = _argparse_type(tp)
    if "type" in kw and "metavar" not in kw:
        kw["metavar"] = name.upper()
    return kw


def _argparse_type(tp: Any) -> dict[str, Any]:
    tp = _strip_optional(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"choices": list(args)}
    if tp in (int, float, str):
        return {"type": tp}
    if origin in (list, tuple) and args and args[0] in (int, float, str):  # repeated, the flag adds to its list
        return {"type": _list_of(args[0]), "metavar": "A,B,...", "action": "extend"}
    if origin in (typing.Union, types.UnionType):
        scalars = [a for a in args if a in (int, float, str)]
        lists = [a for a in args if typing.get_origin(a) is list]
        if len(scalars) == 1 and lists:
            return {"type": _scalar_or_list(scalars[0])}
    raise TypeError(f"no command-line form for a field of type {tp!r}; add one in losa.cli.flags")


#: ``json_schema_extra`` key of a field whose command-line default is not its Python one (shown in the help instead)
DEFAULT_HELP = "default_help"


def _help(info: FieldInfo) -> str:
    text = info.description or ""
    cli_default = (info.json_schema_extra or {}).get(DEFAULT_HELP)  # type: ignore[union-attr]
    if cli_default:
        return f"{text} (default: {cli_default})".replace("%", "%%")
    default = info.get_default(call_default_factory=True)
    if isinstance(default, BaseModel | dict) or info.json_schema_extra or default is None:
        return text.replace("%", "%%")
    shown = (",".join(map(str, default)) or "none") if isinstance(default, list | tuple) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def add_config_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[BaseModel],
                     skip: tuple[str, ...] = (), prefix: tuple[str, ...] = (),
                     taken: set[str] | None = None, root: argparse.ArgumentParser | None = None) -> list[Flag]:
    """Add one flag per field of ``cls`` (recursively for nested configs) to ``parser``.

    Args:
        parser: the parser or group that receives the flags.
        cls: the config class.
        skip: top-level field names that the command sets itself (not flags).
        prefix: field path of ``cls`` inside the root config (for nested configs).
        taken: option strings already used (shared across the recursion).
        root: the parser that owns argument groups (defaults to ``parser``).
    Returns:
        the flags added, in field order.
    Raises:
        TypeError: a field type has no command-line form (a developer error, caught by the tests).
    """
    root = root or parser  # type: ignore[assignment]
    taken = set() if taken is None else taken
    taken.update(s for a in getattr(root, "_actions", []) for s in a.option_strings)
    flags: list[Flag] = []
    for name, info in cls.model_fields.items():
        if name in skip:
            continue
        path = (*prefix, name)
        tp = _strip_optional(info.annotation)
        if _is_config(tp):
            group = root.add_argument_group(f"{name} options ({tp.__name__})", info.description)  # type: ignore[union-attr]
            flags += add_config_flags(group, tp, prefix=path, taken=taken, root=root)
            continue
        if (info.json_schema_extra or {}).get(PRUNER_OPTIONS):  # type: ignore[union-attr]
            flags += _add_pruner_option_flags(root, path, taken)  # type: ignore[arg-type]
            continue
        option = "--" + name.replace("_", "-")
        if option in taken:
            option = "--" + "-".join(path).replace("_", "-")
        taken.add(option)
        dest = SEP.join(path)
        parser.add_argument(option, dest=dest, default=None, help=_help(info), **_argparse_kwargs(info.annotation, name))
        flags.append(Flag(option, path, dest))
    return flags


def _add_pruner_option_flags(root: argparse.ArgumentParser, path: tuple[str, ...], taken: set[str]) -> list[Flag]:
    from losa.pruning.base import pruner_classes

    flags = []
    for method, pcls in pruner_classes().items():
        opts = pcls.Options
        if not opts.model_fields:
            continue
        group = root.add_argument_group(f"{method} options", f"only with --method {method}")
        for name, info in opts.model_fields.items():
            option = "--" + name.replace("_", "-")
            if option in taken:
                option = f"--{method}-{name.replace('_', '-')}"
            taken.add(option)
            dest = SEP.join((*path, method, name))
            group.add_argument(option, dest=dest, default=None, help=_help(info), **_argparse_kwargs(info.annotation, name))
            flags.append(Flag(option, (*path, method, name), dest))
    return flags


def config_values(args: argparse.Namespace, flags: list[Flag], values: dict[str, Any] | None = None) -> dict[str, Any]:
    """Overlay the flags the user gave onto ``values`` (e.g. a YAML recipe) as a nested mapping.

    Pruner options are collected under ``options`` without the method level; the config then checks
    that they belong to the chosen method.
    """
    out: dict[str, Any] = dict(values or {})
    for f in flags:
        v = getattr(args, f.dest, None)
        if v is None:
            continue
        path = f.path
        if len(path) == 3 and path[0] == "options":  # ("options", method, name)
            path = (path[0], path[2])
        node = out
        for key in path[:-1]:
            node[key] = dict(node.get(key) or {})
            node = node[key]
        node[path[-1]] = v
    return out
