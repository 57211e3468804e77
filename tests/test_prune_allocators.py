"""One-shot layer-wise sparsity from OWL and RMI (``losa prune --allocator owl|rmi``), against scores computed
by hand from the dense model's own forward (forward hooks, ``output_hidden_states``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, make_tiny_tokenizer

import losa
from losa.allocation.allocators import allocate
from losa.cli import main
from losa.errors import LosaError
from losa.models.linear import get_weight
from losa.models.registry import get_decoder_layers, layer_sizes, linear_modules


def _calib() -> torch.Tensor:
    return torch.randint(4, 128, (8, 32), generator=torch.Generator().manual_seed(0))


def _layer_sparsity(model) -> list[float]:
    out = []
    for layer in get_decoder_layers(model):
        ws = [get_weight(m) for m in linear_modules(layer).values()]
        out.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    return out


def test_owl_one_shot_prunes_each_layer_to_the_owl_sparsity_of_its_outlier_ratio():
    model, dense = make_tiny_model("llama", layers=4), make_tiny_model("llama", layers=4)
    calib, m, lam, target = _calib(), 2.0, 0.05, 0.6
    inputs: dict[torch.nn.Module, torch.Tensor] = {}  # by hand: every linear's input in one dense forward
    hooks = [mod.register_forward_hook(lambda mod, a, _o: inputs.__setitem__(mod, a[0].detach()))
             for layer in get_decoder_layers(dense) for mod in linear_modules(layer).values()]
    with torch.no_grad():
        dense(calib)
    for h in hooks:
        h.remove()
    ratios = []
    for layer in get_decoder_layers(dense):  # Wanda scores |W_ij|·‖X_j‖₂; outliers above m × the layer's mean
        s = torch.cat([(mod.weight.double().abs() * inputs[mod].double().reshape(-1, mod.in_features).norm(dim=0))
                       .reshape(-1) for mod in linear_modules(layer).values()])
        ratios.append(float((s > m * s.mean()).double().mean()))
    # OWL (symmetric band): normalise the ratios to [0, 1], centre on their size-weighted mean, scale to ±lam
    sizes = np.array([sum(get_weight(x).numel() for x in linear_modules(layer).values())
                      for layer in get_decoder_layers(dense)], dtype=np.float64)
    r = np.array(ratios)
    c = (r - r.min()) / (r.max() - r.min())
    c -= (sizes / sizes.sum()) @ c
    want = target - lam * c / np.abs(c).max()
    rep = losa.prune(model, None, {"method": "wanda", "sparsity": target, "allocator": "owl", "owl_m": m,
                                   "owl_lambda": lam}, calib_ids=calib, progress=False)
    assert rep.allocation["outlier_ratios"] == pytest.approx(ratios, abs=1e-12)
    assert rep.targets == pytest.approx(want.tolist(), abs=1e-12)
    assert _layer_sparsity(model) == pytest.approx(want.tolist(), abs=2e-3)  # counted on the pruned weights
    assert rep.sparsity.overall == pytest.approx(target, abs=1e-3)


def test_rmi_one_shot_scores_the_layers_inputs_by_linear_cka():
    model, dense = make_tiny_model("llama", layers=4), make_tiny_model("llama", layers=4)
    calib = _calib()
    with torch.no_grad():  # by hand: the inputs of decoder layer i are hidden_states[i] of the dense forward
        hidden = dense(calib, output_hidden_states=True).hidden_states[:4]
    feats = [h.double().reshape(len(calib), -1).numpy() for h in hidden]  # one row per calibration window

    def cka(x: np.ndarray, y: np.ndarray) -> float:  # feature-space linear CKA of centred features
        xc, yc = x - x.mean(0), y - y.mean(0)
        return np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))

    want_cka = np.array([[cka(a, b) for b in feats] for a in feats])
    rep = losa.prune(model, None, {"method": "wanda", "sparsity": 0.6, "allocator": "rmi"}, calib_ids=calib,
                     progress=False)
    assert np.allclose(rep.allocation["cka"], want_cka, atol=1e-9)
    want = allocate("rmi", 0.6, layer_sizes(dense), cka=want_cka)  # the LP itself: tests/test_allocators.py
    assert rep.targets == pytest.approx(want.tolist(), abs=1e-9) and len(set(np.round(want, 6))) > 1
    assert _layer_sparsity(model) == pytest.approx(list(want), abs=2e-3)


def test_prune_cli_with_owl_records_and_labels_it(tmp_path, capsys):
    d = tmp_path / "tiny"
    make_tiny_model("llama", layers=4).save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    out = tmp_path / "owl"
    assert main(["prune", str(d), "--calib", "self", "--nsamples", "4", "--seqlen", "16", "--sparsity", "0.6",
                 "--allocator", "owl", "--owl-m", "2", "--eval", "none", "--out", str(out), "--quiet"]) == 0
    log = capsys.readouterr().out
    manifest = json.loads((out / "losa.json").read_text())
    lo, hi = min(manifest["layer_targets"]), max(manifest["layer_targets"])
    assert f"  layer-wise sparsity (owl): {lo:.4f} to {hi:.4f} over 4 layers" in log and lo < 0.6 < hi
    assert manifest["allocation"]["method"] == "owl" and len(manifest["allocation"]["outlier_ratios"]) == 4
    assert "| wanda 60% (owl layer-wise) | calibration self 4x16" in log
    from losa.cli.prune import _default_out
    from losa.report import compare

    assert _default_out("m", losa.PruneConfig(allocator="owl")).name == "m-wanda-50-owl"
    assert "| 60% | Wanda + OWL |" in compare([out])[0]


@pytest.mark.parametrize("fields,msg", [
    ({"owl_lambda": 0.1}, r"owl_lambda only applies to allocator owl; add allocator='owl' \(--allocator owl\)"),
    ({"allocator": "owl", "beta": 2.0}, r"beta only applies to allocator rmi"),
    ({"allocator": "rmi", "owl_m": 3.0}, r"owl_m only applies to allocator owl"),
    ({"allocator": "owl", "nm": "2:4"}, r"allocator=owl spreads one unstructured sparsity over the layers"),
    ({"allocator": "atp", "beta": 0.5}, r"beta only applies to allocator rmi; .* \(ATP's step is atp_beta "
                                        r"\(--atp-beta\)\)"),
    ({"allocator": "rmi", "nsamples": 1}, r"allocator rmi compares the layers by linear CKA .* needs nsamples "
                                          r"\(--nsamples\) 2 or more, got 1"),
])
def test_allocator_parameters_need_their_allocator(fields, msg):
    with pytest.raises(LosaError, match=msg):
        losa.PruneConfig(**fields)


@pytest.mark.parametrize("allocator", ["owl", "rmi"])
def test_one_shot_allocation_equals_a_one_step_losa_run_without_fine_tuning(allocator):
    """Two code paths, one algorithm: the one-shot prune's layer targets and masks are those of losa.run with T=1
    and nothing fine-tuned (how benchmarks/bench_losa.py measured the OWL and RMI baselines)."""
    import warnings

    calib = _calib()
    extra = {"owl_m": 2.0} if allocator == "owl" else {}
    a, b = make_tiny_model("llama", layers=4), make_tiny_model("llama", layers=4)
    one_shot = losa.prune(a, None, {"sparsity": 0.6, "allocator": allocator, "device": "cpu", **extra},
                          calib_ids=calib, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nothing is fine-tuned, as intended
        run = losa.run(b, None, {"sparsity": 0.6, "allocator": allocator, "steps": 1, "device": "cpu", "nsamples": 8,
                                 "seqlen": 32, "recon_nsamples": 2, **extra}, calib_ids=calib, progress=False)
    assert one_shot.targets == run.steps[-1].layer_target_sparsity
    for la, lb in zip(get_decoder_layers(a), get_decoder_layers(b)):
        for (name, x), y in zip(linear_modules(la).items(), linear_modules(lb).values()):
            assert torch.equal(get_weight(x) == 0, get_weight(y) == 0), name
