"""The package layout: every module importable and unshadowed, import directions, no leaked hooks,
configs that generate the CLI, pruner options owned by their pruner."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.errors import LosaError

SRC = Path(losa.__file__).parent
ALGORITHM_PACKAGES = ("pruning", "allocation", "lora", "calib", "models", "data")
SUBPACKAGES = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").is_file())


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(SRC)], prefix="losa."))


def test_every_subpackage_is_a_module():
    assert {"pipelines", "allocation", "export", "calib", "pruning", "lora", "inference", "serve", "cli"} <= set(SUBPACKAGES)
    for name in SUBPACKAGES:
        mod = importlib.import_module(f"losa.{name}")
        assert type(mod).__name__ == "module", name


def test_no_module_is_shadowed_by_an_attribute():
    """``import losa.x.y`` gives a module and ``losa.x.y`` is that module, after every public name
    (lazy ones included) has been bound: no function or class carries a submodule's name."""
    names = _all_modules()
    for name in names:
        importlib.import_module(name)
    for name in ["losa"] + names:
        pkg = sys.modules[name]
        for attr in getattr(pkg, "__all__", []):
            getattr(pkg, attr)  # bind lazy attributes
    for name in names:
        parent, _, leaf = name.rpartition(".")
        assert getattr(sys.modules[parent], leaf) is sys.modules[name], f"{name} is shadowed in {parent}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package,forbidden", [
    *[(p, ("pipelines", "cli", "report", "serve", "export")) for p in ALGORITHM_PACKAGES],
    ("inference", ("pipelines",)),
    ("serve", ("pipelines",)),
])
def test_import_directions(package, forbidden):
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for mod in _imports(path):
            if any(mod == f"losa.{f}" or mod.startswith(f"losa.{f}.") for f in forbidden):
                bad.append(f"{path.relative_to(SRC)} imports {mod}")
    assert not bad, bad


def test_help_does_not_import_transformers():
    code = ("import sys; from losa.cli import build_parser; build_parser().format_help(); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_help_text_renders_percent_signs_once():
    """argparse %-formats argument help but not descriptions: ``%%`` in a description printed as "70 %%" (the
    new-user trial's bench-runtime --help). Every command's rendered help has single percent signs."""
    from losa.cli import build_parser

    def commands(parser, prefix=""):  # every (sub)command's parser, nested ones (eval ppl) included
        for action in parser._actions:
            if isinstance(action.choices, dict):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}", sub
                    yield from commands(sub, f"{prefix}{name} ")

    found = dict(commands(build_parser()))
    bad = [name for name, p in found.items() if "%%" in p.format_help()]
    assert {"compact", "bench-runtime", "eval ppl", "eval zeroshot"} <= set(found) and not bad, bad


# ---------------------------------------------------------------------------------------------- configs
def _config_fields(cls, prefix=()):
    from pydantic import BaseModel

    from losa.cli.flags import _strip_optional
    from losa.utils.config import PRUNER_OPTIONS

    for name, info in cls.model_fields.items():
        tp = _strip_optional(info.annotation)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            yield from _config_fields(tp, (*prefix, name))
        elif (info.json_schema_extra or {}).get(PRUNER_OPTIONS):
            from losa.pruning.base import pruner_classes

            for method, pcls in pruner_classes().items():
                for opt in pcls.Options.model_fields:
                    yield (*prefix, name, method, opt), pcls.Options.model_fields[opt]
        else:
            yield (*prefix, name), info


@pytest.mark.parametrize("command,cls_path", [("prune", "losa.pipelines.oneshot:PruneConfig"),
                                              ("run", "losa.pipelines.losa.config:LoSAConfig")])
def test_every_config_field_has_a_flag_and_a_description(command, cls_path):
    from losa.cli import build_parser

    mod, _, name = cls_path.partition(":")
    cls = getattr(importlib.import_module(mod), name)
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    dests = {a.dest for a in sub._actions}
    missing, undocumented = [], []
    for path, info in _config_fields(cls):
        if "__".join(path) not in dests:
            missing.append(".".join(path))
        if not info.description:
            undocumented.append(".".join(path))
    assert not missing and not undocumented, (missing, undocumented)


def test_flags_reach_nested_configs_and_pruner_options(tmp_path):
    from losa.cli import build_parser
    from losa.cli.common import config_from_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  lr: 0.001\n  epochs: 2\nsteps: 3\n")
    args = build_parser().parse_args(["run", "--recipe", str(recipe), "--method", "sparsegpt", "--blocksize", "32",
                                      "--finetune-seed", "7", "--no-bf16", "--lr", "0.01", "--calib", "c4"])
    cfg = config_from_args(args)
    assert (cfg.steps, cfg.finetune.epochs, cfg.finetune.lr, cfg.finetune.seed, cfg.finetune.bf16) == (3, 2, 0.01, 7, False)
    assert cfg.pruner().options.blocksize == 32 and cfg.pruner().options.percdamp == 0.01
    args = build_parser().parse_args(["prune", "--nm-n", "1,3", "--nm", "2:4", "--calib", "c4"])
    assert config_from_args(args).nm_n == [1, 3]
    args = build_parser().parse_args(["prune", "--sparsity", "0.3,0.6", "--calib", "c4"])
    assert config_from_args(args).sparsity == [0.3, 0.6]


def test_an_option_of_another_pruner_fails_in_one_line():
    with pytest.raises(LosaError, match=r"option 'blocksize' does not apply to method='wanda' \(--method wanda\): it "
                                        r"is an option of sparsegpt; drop it") as e:
        losa.PruneConfig(method="wanda", options={"blocksize": 64})
    assert "\n" not in str(e.value)
    with pytest.raises(LosaError, match="no pruner has it"):
        losa.LoSAConfig(method="sparsegpt", options={"blocksze": 64})
    from losa.cli import main

    assert main(["prune", "--method", "wanda", "--percdamp", "0.1", "--calib", "c4"]) == 2


def test_unknown_recipe_key_is_one_line(tmp_path):
    with pytest.raises(LosaError, match=r"^invalid config: sparsty: unknown option"):
        losa.PruneConfig(sparsty=0.5)


# ---------------------------------------------------------------------------------------------- hooks
def _assert_no_hooks(model):
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, f"hook left on {name}"
        assert "forward" not in vars(mod), f"patched forward left on {name}"


def test_no_hook_survives_prune_losa_step_or_a_failing_visitor(tmp_path):
    from losa.calib.engine import LayerwiseEngine
    from losa.pipelines.oneshot import PruneVisitor
    from losa.pruning.base import get_pruner
    from losa.pruning.target import Target

    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    for method, sequential in (("wanda", "layer"), ("sparsegpt", "module")):
        model = make_tiny_model("llama", layers=2)
        losa.prune(model, None, losa.PruneConfig(method=method, sparsity=0.5, sequential=sequential),
                   calib_ids=ids, progress=False)
        _assert_no_hooks(model)

    class Boom(PruneVisitor):
        def visit_module(self, index, name, mod, stat):
            if name.endswith("up_proj"):  # mid-layer, inside the chunked MLP's patched forward
                raise RuntimeError("boom")
            super().visit_module(index, name, mod, stat)

    model = make_tiny_model("llama", layers=2)
    visitor = Boom(get_pruner("sparsegpt"), [Target(sparsity=0.5)] * 2, single_pass=True)
    with pytest.raises(RuntimeError, match="boom"):
        LayerwiseEngine(model, ids, batch_size=len(ids), progress=False).run(visitor)
    _assert_no_hooks(model)

    data = tmp_path / "ft.jsonl"
    data.write_text("\n".join('{"text": "' + " ".join(f"word{(i + j) % 90}" for j in range(20)) + '"}'
                              for i in range(8)))
    model = make_tiny_model("llama", layers=2)
    losa.run(model, make_tiny_tokenizer(), {"sparsity": 0.5, "steps": 1, "nsamples": 4, "seqlen": 16,
                                            "recon_nsamples": 2, "calib": "c4", "finetune_data": str(data),
                                            "finetune": {"batch_size": 4, "max_length": 24}},
             calib_ids=ids, progress=False)
    _assert_no_hooks(model)
