"""PruneConfig.ignore: the linears it names stay exactly as they were, the others are pruned as without it,
verification and `losa inspect` skip the ignored ones, and bad patterns fail before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.cli import main
from losa.errors import LosaError
from losa.models.linear import get_weight
from losa.models.registry import get_decoder_layers, linear_modules

IGNORE = ["mlp.down_proj", "0.self_attn.*"]


def weights(model) -> dict[tuple[int, str], torch.Tensor]:
    return {(i, n): get_weight(m).detach().clone() for i, layer in enumerate(get_decoder_layers(model))
            for n, m in linear_modules(layer).items()}


def left_dense(i: int, name: str) -> bool:  # IGNORE, spelled out by hand
    return name == "mlp.down_proj" or (i == 0 and name.startswith("self_attn."))


def test_magnitude_ignore_keeps_named_linears_and_prunes_the_rest_as_without_it():
    dense = weights(make_tiny_model("llama", seed=3))
    with_ignore, plain = make_tiny_model("llama", seed=3), make_tiny_model("llama", seed=3)
    rep = losa.prune(with_ignore, None, losa.PruneConfig(method="magnitude", sparsity=0.5, ignore=IGNORE),
                     progress=False)
    losa.prune(plain, None, losa.PruneConfig(method="magnitude", sparsity=0.5), progress=False)
    got, ref = weights(with_ignore), weights(plain)
    assert sum(left_dense(*k) for k in got) == 2 + 4  # two down projections, layer 0's q/k/v/o
    for key, w in got.items():
        torch.testing.assert_close(w, dense[key] if left_dense(*key) else ref[key], rtol=0, atol=0)
    zeros = sum(int((w == 0).sum()) for w in got.values())
    assert rep.sparsity.overall == pytest.approx(zeros / sum(w.numel() for w in got.values()))
    assert rep.sparsity.overall < 0.5  # the model as a whole is less sparse than the target


def test_wanda_nm_ignore_verifies_the_pruned_linears_only():
    model = make_tiny_model("llama", seed=5)
    dense = weights(model)
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    losa.prune(model, None, losa.PruneConfig(method="wanda", nm="2:4", ignore=IGNORE), calib_ids=ids, progress=False)
    for key, w in weights(model).items():
        if left_dense(*key):
            assert torch.equal(w, dense[key])
        else:  # exactly 2 kept of every 4 inputs
            assert ((w.reshape(w.shape[0], -1, 4) != 0).sum(-1) == 2).all(), key


def test_bad_patterns_fail_before_any_work():
    model = make_tiny_model("llama")
    before = weights(model)
    with pytest.raises(LosaError, match="'mlp.dwn_proj' matches no linear"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["mlp.dwn_proj"]}, progress=False)
    with pytest.raises(LosaError, match="nothing would be pruned"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["*"]}, progress=False)
    with pytest.raises(LosaError, match="empty pattern"):
        losa.PruneConfig(ignore=[" "])
    assert all(torch.equal(w, before[k]) for k, w in weights(model).items())


def test_cli_ignore_is_recorded_and_inspect_checks_the_rest(tmp_path, capsys):
    src = tmp_path / "tiny"
    make_tiny_model("llama", layers=2).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    out = tmp_path / "pruned"
    assert main(["prune", str(src), "--method", "magnitude", "--nm", "2:4", "--ignore", ",".join(IGNORE),
                 "--eval", "none", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "left dense (--ignore mlp.down_proj,0.self_attn.*): 6 of 14 linear modules" in said
    manifest = json.loads((out / "losa.json").read_text())
    assert manifest["recipe"]["ignore"] == IGNORE
    assert main(["inspect", str(out)]) == 0
    said = capsys.readouterr().out
    assert "6 modules left dense by the recorded ignore patterns" in said and "satisfied by every module" in said
    assert main(["compare", str(out)]) == 0
    assert "Magnitude (mlp.down_proj,0.self_attn.* dense)" in capsys.readouterr().out
    manifest["recipe"]["ignore"] = []  # without the record, the dense linears violate 2:4
    (out / "losa.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(out)]) == 1
    assert "VIOLATED in 6 modules" in capsys.readouterr().out


def test_moe_expert_matrices_by_pattern():
    from test_moe import make_moe

    model = make_moe("mixtral")
    ids = torch.randint(3, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    rep = losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5,
                                                   ignore=["mlp.experts.*.down_proj", "1.mlp.experts.0.*"]),
                     calib_ids=ids, progress=False)
    dense = {n for n, r in rep.sparsity.modules.items() if r.zeros == 0}
    by_hand = {f"model.layers.{i}.mlp.experts.{e}.down_proj" for i in (0, 1) for e in range(4)}
    by_hand |= {f"model.layers.1.mlp.experts.0.{p}" for p in ("gate_proj", "up_proj")}
    assert dense == by_hand
    assert all(r.sparsity == pytest.approx(0.5) for n, r in rep.sparsity.modules.items() if n not in by_hand)
