"""``losa inspect``: sparsity of every linear module, per layer and overall, and N:M checks."""

from __future__ import annotations

import argparse

from losa.cli.common import add_model_arg, check_model_arg, checkpoint_manifest
from losa.errors import LosaError
from losa.pruning.masks import parse_nm


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="report the sparsity of a model and check N:M patterns",
                       description="Per-module, per-layer and overall sparsity of the decoder's linear layers.")
    add_model_arg(p, default=None)
    next(a for a in p._actions if a.dest == "model").help = "local HF directory, hub id, .gguf file or built-in alias"
    p.add_argument("--nm", help="check this N:M pattern (e.g. 2:4) on every module; a violation exits with "
                                "status 1")
    p.add_argument("--modules", action="store_true", help="list every module, not only layers")
    p.add_argument("--json", dest="json_out", help="also write the full report to this JSON file")
    p.add_argument("--min-sparsity", type=float, default=None,
                   help="exit with status 1 if the overall sparsity is below this value")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    import losa
    from losa.export.verify import sparsity_report
    from losa.models.registry import get_decoder_layers
    from losa.pruning.ignore import module_ignored
    from losa.utils.io import atomic_write_json, check_output_file

    if args.min_sparsity is not None and not 0.0 <= args.min_sparsity <= 1.0:
        raise LosaError(f"--min-sparsity {args.min_sparsity} is outside [0, 1]; give a fraction, e.g. 0.5 for 50 %")
    nm: tuple[int, int] | list[tuple[int, int]] | None = parse_nm(args.nm) if args.nm else None
    label = args.nm
    if args.json_out:
        check_output_file(args.json_out, "--json")
    check_model_arg(args.model)
    recorded = recorded_pattern(args.model)
    if nm is None and recorded is not None:
        label, nm = recorded
        print(f"checking the {label} pattern recorded in {args.model}/losa.json (--nm checks another)")
    elif recorded is not None and recorded[0] != args.nm:
        print(f"note: {args.model}/losa.json records the {recorded[0]} pattern; --nm {args.nm} checks {args.nm} on "
              "every layer (without --nm the recorded one is checked; linears its ignore patterns left dense are "
              "skipped either way)")
    model, _ = losa.load_model(args.model, dtype=args.dtype)
    if isinstance(nm, list) and len(nm) != (layers := len(get_decoder_layers(model))):
        raise LosaError(f"{args.model}/losa.json records N for {len(nm)} decoder layers but the model has {layers}; "
                        "check a pattern with --nm instead")
    rep = sparsity_report(model, nm)
    print(f"{'layer':>5}  {'params':>12}  {'sparsity':>8}")
    for row in rep.layers:
        print(f"{row.layer:>5}  {row.numel:>12,}  {row.sparsity:>8.4f}")
    ignore = recorded_ignore(args.model)
    dense = {n for n, m in rep.modules.items() if module_ignored(ignore, m)}  # left dense on purpose
    for n in dense:
        rep.modules[n].nm_ok = None  # not checked
    if args.modules:
        for name, m in rep.modules.items():
            extra = f"  {m.nm} {'ok' if m.nm_ok else 'VIOLATED'}" if m.nm else ""
            extra = "  left dense (ignore)" if name in dense else extra
            print(f"  {name:<48} {str(tuple(m.shape)):>14}  {m.sparsity:.4f}{extra}")
    print(f"overall sparsity: {rep.overall:.4f} ({rep.numel:,} weights in decoder linear layers)"
          + (f"; linears left dense on purpose (ignore {','.join(ignore)}): {len(dense)}" if ignore else ""))
    ok = True
    if nm is not None:
        bad = [n for n, m in rep.modules.items() if m.nm_ok is False]
        left = len(dense)
        if left:
            print(f"{left} modules left dense by the recorded ignore patterns ({','.join(ignore)}) are not checked")
        ok = not bad
        every = "every module checked" if left else "every module"
        print(f"{label} pattern: {f'satisfied by {every}' if ok else f'VIOLATED in {len(bad)} modules'}")
    else:
        for m_ in (4, 8):
            counts = [m.max_nonzeros_per_group[str(m_)] for m in rep.modules.values()]
            if None in counts:
                print(f"no N:{m_} pattern: some module's input width is not a multiple of {m_}")
            elif max(counts) >= m_:
                print(f"no N:{m_} pattern: some group of {m_} has no zero")
            else:  # only N:M with 1 <= N < M is a pattern (--nm refuses the others)
                print(f"at most {max(counts)} non-zeros in any group of {m_} (satisfies {max(max(counts), 1)}:{m_})")
    if args.json_out:  # with the recorded ignore patterns; their modules' nm_ok is null (not checked)
        atomic_write_json(args.json_out, rep.model_dump() | {"ignore": ignore})
    if args.min_sparsity is not None and rep.overall < args.min_sparsity:
        print(f"overall sparsity {rep.overall:.4f} is below --min-sparsity {args.min_sparsity}")
        ok = False
    return 0 if ok else 1


def recorded_ignore(model: str) -> list[str]:
    """The ``ignore`` patterns (linears left dense) that a ``losa prune`` or ``losa run`` checkpoint records in its
    ``losa.json``; empty for any other model."""
    ignore = (checkpoint_manifest(model).get("recipe") or {}).get("ignore") or []
    return [p for p in ignore if isinstance(p, str)] if isinstance(ignore, list) else []


def recorded_pattern(model: str) -> tuple[str, tuple[int, int] | list[tuple[int, int]]] | None:
    """The N:M pattern a losa checkpoint records in its ``losa.json`` (written by ``losa prune`` / ``losa run``).

    Args:
        model: the MODEL argument (any name; only a directory with a ``losa.json`` records a pattern).
    Returns:
        (label, pattern): ``("2:4", (2, 4))``, or for mixed N:M ``("mixed 2:8", [(n_l, 8) per decoder layer])``;
        None when nothing is recorded (no losa.json, unstructured, or a mixed N:M run without its per-layer N).
    """
    manifest = checkpoint_manifest(model)
    try:
        recipe = manifest.get("recipe") or {}
        n, m = parse_nm(recipe["nm"])
        per_layer = [int(k) for k in recipe.get("nm_n") or manifest.get("nm_n") or []]  # prune; a run's model
    except (ValueError, AttributeError, KeyError, TypeError, LosaError):
        return None
    if per_layer:
        mixed = recipe.get("mixed_nm") or len(set(per_layer)) > 1
        return f"{'mixed ' if mixed else ''}{n}:{m}", [(k, m) for k in per_layer]
    return None if recipe.get("mixed_nm") else (f"{n}:{m}", (n, m))
