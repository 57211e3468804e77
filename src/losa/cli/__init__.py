"""The ``losa`` command line. Each command lives in its own module exposing ``register(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from losa.errors import LosaError

#: command modules, in help order; a module that is absent (optional feature) is skipped
COMMAND_MODULES = ("prune", "eval", "inspect", "run", "generate", "serve", "compact", "report", "bench_runtime")


class LosaArgumentParser(argparse.ArgumentParser):
    """argparse with losa's one-line errors: ``error: MESSAGE (did you mean --x?); see `losa CMD --help```
    instead of the usage block, for every command (subcommands are built with this class too)."""

    def error(self, message: str) -> NoReturn:  # noqa: D102
        self.exit(2, f"error: {message}{_did_you_mean(self, message)}; see `{self.prog} --help`\n")


def _did_you_mean(parser: argparse.ArgumentParser, message: str) -> str:
    """`` (did you mean --sparsity?)`` for a misspelled option named in an 'unrecognized arguments' error."""
    import difflib

    if not message.startswith("unrecognized arguments:"):
        return ""
    known = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    words = message.split(":", 1)[1].split()
    words = words[: words.index("--")] if "--" in words else words  # after "--" every word is a positional
    guesses = [(w, difflib.get_close_matches(w.split("=", 1)[0], known, n=1, cutoff=0.75))
               for w in words if w.startswith("--")]
    found = [(w.split("=", 1)[0], g[0]) for w, g in guesses if g]
    if len(found) == 1:
        return f" (did you mean {found[0][1]}?)"
    return f" (did you mean {', '.join(f'{g} for {w}' for w, g in found)}?)" if found else ""


def _early_options(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], argparse.ArgumentParser]:
    """The option words given before a (sub)command's name, and the innermost command's parser."""
    early: list[str] = []
    at = 0
    while (sub := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)) is not None:
        name = next((k for k in range(at, len(words)) if not words[k].startswith("-")), None)
        if name is None or words[name] not in sub.choices:
            break
        early += words[at:name]
        parser, at = sub.choices[words[name]], name + 1
    return early, parser


def _other_commands(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> str:
    """`` [--nm-n is an option of `losa prune`]`` for unknown flags that another command has (``losa run --nm-n``)."""
    own = _command_parser(parser, args)
    if own is parser:
        return ""

    def parsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
        subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
        return [p] + [q for a in subs for c in dict.fromkeys(a.choices.values()) for q in parsers(c)]

    notes = []
    for flag in dict.fromkeys(w.split("=", 1)[0] for w in extra if w.startswith("--")):
        if any(flag in a.option_strings for a in own._actions):  # its own (given in the wrong place)
            continue
        owners = [f"`{p.prog}`" for p in parsers(parser)
                  if p is not own and p is not parser and any(flag in a.option_strings for a in p._actions)]
        if owners:
            notes.append(f"{flag} is an option of {' and '.join(owners)}")
    return f" [{'; '.join(notes)}]" if notes else ""


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The (sub)command's own parser for ``args`` (``losa eval ppl``'s for ``eval ppl``), else ``parser``."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action is not None else None
        if action is None or name not in action.choices:
            return parser
        parser = action.choices[name]


def build_parser() -> argparse.ArgumentParser:
    import losa

    parser = LosaArgumentParser(
        prog="losa",
        description="Make LLMs sparse without losing quality: one-shot pruning, LoSA, evaluation, sparse inference.",
    )
    parser.add_argument("--version", action="version", version=f"losa {losa.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"losa.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"losa.cli.{name}":
                continue
            raise
        mod.register(sub)
    return parser


def _quiet_libraries(progress: bool = True) -> bool | None:
    """Quiet the libraries' logs (and their progress bars unless ``progress``); returns whether transformers
    showed progress bars before (None without transformers), for :func:`_restore_progress_bars`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import transformers
    except ImportError:  # pragma: no cover
        return None
    before = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    # accelerate's note on offloaded parameters: the commands say where the device map put the model
    logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    return before


def _restore_progress_bars(enabled: bool | None) -> None:
    if enabled is None:
        return
    import transformers

    if enabled:
        transformers.utils.logging.enable_progress_bar()
    else:
        transformers.utils.logging.disable_progress_bar()


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    kind = "" if category is UserWarning else f" ({category.__name__} from {os.path.basename(filename)}:{lineno})"
    return f"warning{kind}: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    early, own = _early_options(parser, list(sys.argv[1:] if argv is None else argv))
    owns = {o for a in own._actions for o in a.option_strings}
    if (extra and early and own is not parser  # `losa --quiet prune m`, `losa eval --quiet ppl m`
            and all(w.split("=", 1)[0] in owns for w in early if w.startswith("-"))):
        own.error(f"{' '.join(early)} before the command: put command options after it "
                  f"(`{own.prog} {' '.join(early)} ...`)")
    if extra:  # reported by the command that was given them (its help, its options to suggest)
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}"
                                            f"{_other_commands(parser, args, extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    # one set of library bars (model loading) for a multi-process run: the main process's
    bars = _quiet_libraries(progress=not getattr(args, "quiet", False) and os.environ.get("RANK", "0") == "0")
    formatwarning = warnings.formatwarning  # a warning is one "warning: ..." line, not Python's file:line format
    warnings.formatwarning = _one_line_warning
    try:  # results appear line by line when stdout is a pipe or a file (long runs print as they go)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    except (AttributeError, ValueError):  # replaced by an object without it
        pass
    try:
        return int(args.func(args) or 0)
    except LosaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a command may say what was kept and how to continue
        first = "\n" if sys.stderr.isatty() else ""  # a terminal's cursor may sit at the end of a progress bar
        print(f"{first}interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning
        _restore_progress_bars(bars)  # --quiet is per call (main runs more than once in one process: tests, API)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
