"""``losa run`` flag / recipe parsing (no model needed)."""

from __future__ import annotations

import argparse

import pytest

from losa.cli.run import config_from_args, register
from losa.errors import LosaError


def _parse(argv):
    ap = argparse.ArgumentParser()
    register(ap.add_subparsers())
    return ap.parse_args(["run", "some-model", *argv])


def test_flags_and_recipe_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("sparsity: 0.6\nsteps: 4\nfinetune:\n  lr: 0.0005\n  batch_size: 2\n")
    cfg = config_from_args(_parse(["--recipe", str(recipe), "--steps", "3", "--no-rank-allocation", "--lr", "1e-3",
                                   "--calib", "c4"]))
    assert cfg.sparsity == 0.6 and cfg.steps == 3 and not cfg.rank_allocation and cfg.layerwise_sparsity
    assert cfg.finetune.lr == 1e-3 and cfg.finetune.batch_size == 2
    cfg = config_from_args(_parse(["--no-layerwise-sparsity", "--nm", "2:8", "--mixed-nm", "--distill", "--calib", "c4"]))
    assert cfg.effective_allocator == "uniform" and cfg.target_sparsity == 0.75 and cfg.finetune.distill


def test_bad_flags_are_one_line_errors():
    with pytest.raises(LosaError, match="r_min=9 > r_max=4"):
        config_from_args(_parse(["--r-min", "9", "--r-max", "4", "--calib", "c4"]))
    with pytest.raises(LosaError, match="steps T=0"):
        config_from_args(_parse(["--steps", "0", "--calib", "c4"]))
