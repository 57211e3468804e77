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
    with pytest.raises(LosaError, match="'down_proj' matches no linear .*for every down_proj write \\*.down_proj"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["down_proj"]}, progress=False)
    with pytest.raises(LosaError, match="'mlp.dwn_proj' matches no linear"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["mlp.dwn_proj"]}, progress=False)
    with pytest.raises(LosaError, match="nothing would be pruned"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["*"]}, progress=False)
    with pytest.raises(LosaError, match="regular expression"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["re:.*down_proj"]}, progress=False)
    with pytest.raises(LosaError, match="lm_head, which is outside the decoder layers"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["lm_head"]}, progress=False)
    with pytest.raises(LosaError, match=r"names model.layers.0.self_attn, a module .* e.g. \*.self_attn.\*"):
        losa.prune(model, None, {"method": "magnitude", "ignore": ["*.self_attn"]}, progress=False)
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
    assert "left dense (ignore mlp.down_proj,0.self_attn.*): 6 of 14 linear modules" in said
    manifest = json.loads((out / "losa.json").read_text())
    assert manifest["recipe"]["ignore"] == IGNORE
    assert main(["inspect", str(out), "--json", str(tmp_path / "i.json")]) == 0
    said = capsys.readouterr().out
    assert "6 modules left dense by the recorded ignore patterns" in said
    assert "satisfied by every module checked" in said
    inspected = json.loads((tmp_path / "i.json").read_text())
    assert inspected["ignore"] == IGNORE
    assert sorted(m["nm_ok"] is None for m in inspected["modules"].values()) == [False] * 8 + [True] * 6
    zeros = sum(m["zeros"] for m in inspected["modules"].values())
    overall = zeros / sum(m["numel"] for m in inspected["modules"].values())  # below 50 %: six linears are dense
    assert main(["compare", str(out)]) == 0
    table = capsys.readouterr().out  # labelled by the sparsity reached, the pruned linears' pattern beside it
    assert "Magnitude (mlp.down_proj,0.self_attn.* dense)" in table
    assert f"{100 * overall:.0f}% (2:4 of the pruned linears)" in table
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


@pytest.mark.parametrize("sequential", ["module", "layer"])
def test_sparsegpt_full_names_and_a_gate_left_dense_beside_its_pruned_twin(sequential):
    """Full names as losa inspect prints them; gate_proj left dense while up_proj (fed the same input, sharing its
    statistic in module mode) is pruned; no Hessian is built for the ignored linear."""
    from losa.pruning.sparsegpt import SparseGPTPruner

    model = make_tiny_model("llama", seed=7)
    dense = weights(model)
    built = []
    stat = SparseGPTPruner.stat

    @staticmethod
    def counting(in_features, device=None):
        built.append(in_features)
        return stat(in_features, device=device)

    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(2))
    ignore = ["model.layers.1.mlp.gate_proj", "model.layers.0.self_attn.o_proj"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SparseGPTPruner, "stat", counting)
        rep = losa.prune(model, None, losa.PruneConfig(method="sparsegpt", sparsity=0.5, sequential=sequential,
                                                       device="cpu", ignore=ignore), calib_ids=ids, progress=False)
    assert len(built) == 2 * 7 - 2
    for (i, name), w in weights(model).items():
        if (i, name) in ((1, "mlp.gate_proj"), (0, "self_attn.o_proj")):
            assert torch.equal(w, dense[(i, name)])
        else:
            assert rep.sparsity.modules[f"model.layers.{i}.{name}"].sparsity == pytest.approx(0.5, abs=1e-3)


def test_custom_visitor_patterns_are_kept_and_verified():
    from losa.pipelines.oneshot import PruneVisitor

    model = make_tiny_model("llama", seed=3)
    dense = weights(model)
    cfg = losa.PruneConfig(method="magnitude", ignore=["mlp.down_proj"])
    visitor = PruneVisitor(cfg.pruner(), cfg.layer_targets(2), ignore=("mlp.up_proj",))
    rep = losa.prune(model, None, cfg, progress=False, visitor=visitor)
    assert visitor.ignore == ("mlp.up_proj",)  # the caller's visitor keeps its own patterns
    assert rep.recipe["ignore"] == ["mlp.up_proj", "mlp.down_proj"]  # the recipe records what was left dense
    for (i, name), w in weights(model).items():
        assert torch.equal(w, dense[(i, name)]) is (name in ("mlp.up_proj", "mlp.down_proj")), name


def test_cli_typo_fails_before_the_dense_evaluation_and_yaml_takes_a_string(tmp_path, capsys, monkeypatch):
    import losa.eval.ppl

    src = tmp_path / "tiny"
    make_tiny_model("llama", layers=2).save_pretrained(src)
    make_tiny_tokenizer().save_pretrained(src)
    text = tmp_path / "t.txt"
    text.write_text("word " * 600)
    capsys.readouterr()  # the tiny model's own save bars
    monkeypatch.setattr(losa.eval.ppl, "perplexity", lambda *a, **k: pytest.fail("evaluated before the check"))
    assert main(["prune", str(src), "--method", "magnitude", "--ignore", "mlp.dwn_proj", "--compare-dense",
                 "--eval", str(text), "--no-save", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "'mlp.dwn_proj' matches no linear" in err and len(err.strip().splitlines()) == 1
    assert losa.PruneConfig(ignore="mlp.down_proj, 0.*").ignore == ["mlp.down_proj", "0.*"]
    assert losa.PruneConfig(ignore="mlp.down_proj,").ignore == ["mlp.down_proj"]  # as the flag reads it


def test_owl_allocation_weighs_only_the_pruned_linears():
    """With ignore, the layer-wise allocator keeps its parameter-weighted mean over the linears it prunes: the
    pruned linears as a whole are at the target, counted from the weights."""
    model = make_tiny_model("llama", seed=11)
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5, allocator="owl", owl_m=1.5,
                                             ignore=["1.mlp.*"]), calib_ids=ids, progress=False)
    pruned = [w for (i, n), w in weights(model).items() if not (i == 1 and n.startswith("mlp."))]
    zeros = sum(int((w == 0).sum()) for w in pruned)
    assert zeros / sum(w.numel() for w in pruned) == pytest.approx(0.5, abs=2e-3)


def test_allocators_skip_a_layer_left_dense_entirely():
    """A layer of size 0 takes no part: the others get what the allocator gives them alone, and it gets the target."""
    import numpy as np

    from losa.allocation.allocators import allocate, allocate_live

    got = allocate_live("owl", 0.5, [10, 0, 30], outlier_ratios=[0.1, 0.9, 0.3], lam=0.08)
    alone = allocate("owl", 0.5, [10, 30], outlier_ratios=[0.1, 0.3], lam=0.08)
    assert got[1] == 0.5 and np.allclose(got[[0, 2]], alone)
    cka = np.array([[1.0, 0.2, 0.7], [0.2, 1.0, 0.4], [0.7, 0.4, 1.0]])
    got = allocate_live("rmi", 0.5, [10, 0, 10], cka=cka, beta=1.0, delta=0.05)
    assert np.allclose(got[[0, 2]], allocate("rmi", 0.5, [10, 10], cka=cka[np.ix_([0, 2], [0, 2])], beta=1.0,
                                             delta=0.05))
    model = make_tiny_model("llama", seed=11)  # end to end: the first layer left dense, OWL over the second
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(3))
    rep = losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5, allocator="owl", ignore=["0.*"]),
                     calib_ids=ids, progress=False)
    assert rep.sparsity.layers[0].sparsity == 0.0 and rep.sparsity.layers[1].sparsity == pytest.approx(0.5, abs=2e-3)


def test_hand_written_per_layer_targets_of_a_layer_left_dense_are_named_in_a_warning():
    model = make_tiny_model("llama", seed=12)  # two decoder layers; the first left dense entirely
    with pytest.warns(UserWarning, match=r"1 decoder layer\(s\) dense entirely, so their sparsity entries are not "
                                         r"applied \(layer 0: 0\.7\)"):
        rep = losa.prune(model, None, losa.PruneConfig(method="magnitude", sparsity=[0.7, 0.5], ignore=["0.*"]),
                         progress=False)
    assert rep.sparsity.layers[0].sparsity == 0.0 and rep.sparsity.layers[1].sparsity == pytest.approx(0.5, abs=2e-3)
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match=r"their nm_n entries are not applied \(layer 1: 3\)"):
        losa.prune(make_tiny_model("llama", seed=12), None,
                   losa.PruneConfig(method="wanda", nm="2:4", nm_n=[1, 3], ignore=["1.*"]), calib_ids=ids,
                   progress=False)
    import warnings

    with warnings.catch_warnings():  # a layer only partly left dense keeps its entry: no warning
        warnings.simplefilter("error")
        losa.prune(make_tiny_model("llama", seed=12), None,
                   losa.PruneConfig(method="magnitude", sparsity=[0.7, 0.5], ignore=["0.*.q_proj"]), progress=False)
    with warnings.catch_warnings(record=True) as seen:  # ATP's grid trials build their own lists: not the user's
        warnings.simplefilter("always")
        losa.prune(make_tiny_model("llama", seed=12), None, losa.PruneConfig(method="wanda", sparsity=0.5,
                   allocator="atp", atp_grid_points=3, ignore=["0.*"]), calib_ids=ids, progress=False)
    assert not [w for w in seen if "dense entirely" in str(w.message)]
