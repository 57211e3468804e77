"""The LoSA runner on tiny models: end-to-end run, resume after an interruption, config errors."""

from __future__ import annotations

import importlib
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from losa.errors import LosaError
from losa.models.registry import get_decoder_layers
from losa.pipelines.losa import LoSAConfig, run


class CharTokenizer:
    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 120 for c in text]}


def _data(tmp_path, n=32):
    f = tmp_path / "ft.jsonl"
    f.write_text("\n".join(json.dumps({"text": f"{i % 3} abcdabcdabcd"}) for i in range(n)) + "\n")
    return str(f)


def _cfg(data, **kw):
    base = dict(sparsity=0.6, steps=2, nsamples=4, seqlen=16, recon_nsamples=2, r_max=8, r_min=1,
                omega_first=4, omega_last=6, finetune_data=data, device="cpu",
                finetune={"batch_size": 4, "max_length": 32, "lr": 1e-2, "epochs": 2})
    base.update(kw)
    return LoSAConfig(**base)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def calib():
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))


def test_end_to_end_loss_decreases_and_exact_sparsity(tmp_path, tiny_model, calib):
    model = tiny_model("llama", seed=0, layers=3, hidden=32)
    rep = run(model, CharTokenizer(), _cfg(_data(tmp_path)), out_dir=tmp_path / "out", calib_ids=calib, progress=False)
    steps = rep.steps
    assert [s.step for s in steps] == [1, 2]
    assert steps[0].target_sparsity == pytest.approx(0.6 - 0.6 * 0.5**3)
    losses = steps[0].train_loss + steps[1].train_loss
    assert np.mean(losses[-2:]) < 0.95 * np.mean(losses[:2])
    for s, omega in zip(steps, (4, 6)):
        w = np.full(3, 1 / 3)
        assert w @ np.asarray(s.layer_target_sparsity) == pytest.approx(s.target_sparsity, abs=1e-12)
        assert sum(s.ranks) == 3 * omega and max(s.ranks) <= 8
        assert len(s.cka) == 3 and s.cka[0][0] == pytest.approx(1.0)
        assert all(a >= t - 1 / 32 for a, t in zip(s.layer_achieved_sparsity, s.layer_target_sparsity))
        assert len(s.recon_error_after) == 3 and min(s.recon_error_before) > 0
    # merged model: every adapted module is plain again and at its layer's target (per-row floor)
    for i, layer in enumerate(get_decoder_layers(model)):
        target = steps[-1].layer_target_sparsity[i]
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                per_row = (w == 0).sum(1)
                assert bool((per_row >= int(w.shape[1] * target + 1e-9)).all()), name
    assert rep.results.sparsity == pytest.approx(float(np.mean(rep.results.layer_achieved_sparsity)))
    from losa.report.schema import load_run

    assert load_run(tmp_path / "out").steps[1].ranks == steps[1].ranks  # report.json matches the schema


@pytest.mark.parametrize("targets", [["*"], ["mlp.*"]])
def test_resume_after_interruption_identical(tmp_path, tiny_model, calib, monkeypatch, targets):
    """With lora_target_modules too: the linears it leaves unadapted are pruned, saved and restored alike (a first
    version pruned them outside the resume state, so a resumed run lost their pruning, review)."""
    runmod = importlib.import_module("losa.pipelines.losa.loop")  # the module (losa.pipelines.losa.loop is also the function)

    data = _data(tmp_path, n=16)
    cfg = _cfg(data, steps=2, finetune={"batch_size": 4, "max_length": 32, "lr": 5e-3, "epochs": 1},
               lora_target_modules=targets)
    ref_model = tiny_model("llama", seed=0, layers=2, hidden=32)
    run(ref_model, CharTokenizer(), cfg, out_dir=tmp_path / "a", calib_ids=calib, progress=False)

    real = runmod.finetune
    calls = {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed during step 2's fine-tune
        return real(*a, **kw)

    monkeypatch.setattr(runmod, "finetune", dying)
    model = tiny_model("llama", seed=0, layers=2, hidden=32)
    with pytest.raises(KeyboardInterrupt):
        run(model, CharTokenizer(), cfg, out_dir=tmp_path / "b", calib_ids=calib, progress=False)
    assert json.loads((tmp_path / "b" / "state" / "state.json").read_text())["step"] == 1
    monkeypatch.setattr(runmod, "finetune", real)
    with pytest.raises(LosaError, match="--resume"):
        run(tiny_model("llama", seed=0, layers=2, hidden=32), CharTokenizer(), cfg, out_dir=tmp_path / "b",
            calib_ids=calib, progress=False)
    fresh = tiny_model("llama", seed=0, layers=2, hidden=32)
    rep = run(fresh, CharTokenizer(), cfg, out_dir=tmp_path / "b", resume=True, calib_ids=calib, progress=False)
    assert [s.step for s in rep.steps] == [1, 2]
    a_ad = load_file(str(tmp_path / "a" / "state" / "adapters.safetensors"))
    b_ad = load_file(str(tmp_path / "b" / "state" / "adapters.safetensors"))
    assert a_ad.keys() == b_ad.keys()
    for k in a_ad:  # identical masks, ranks and adapters
        assert torch.equal(a_ad[k], b_ad[k]), k
    wa, wb = _weights(ref_model), _weights(fresh)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    other = _cfg(data, steps=2, finetune={"batch_size": 4, "max_length": 32, "lr": 1e-3, "epochs": 1})
    with pytest.raises(LosaError, match="recipe .* differs"):
        run(tiny_model("llama", seed=0, layers=2, hidden=32), CharTokenizer(), other, out_dir=tmp_path / "b",
            resume=True, calib_ids=calib, progress=False)


def test_config_errors(tmp_path):
    with pytest.raises(LosaError, match="r_min=8 > r_max=4"):
        LoSAConfig(r_min=8, r_max=4)
    with pytest.raises(LosaError, match="steps T=0"):
        LoSAConfig(steps=0)
    with pytest.raises(LosaError, match=r"sparsity: sparsity 1.0 is outside \(0, 1\): a LoSA target is above 0 and below 1"):
        LoSAConfig(sparsity=1.0)
    with pytest.raises(LosaError, match="mixed_nm needs nm"):
        LoSAConfig(mixed_nm=True)


def test_finetune_set_too_small(tmp_path, tiny_model, calib):
    model = tiny_model("llama", seed=0, layers=2, hidden=32)
    with pytest.raises(LosaError, match="too few for 5 steps"):
        run(model, CharTokenizer(), _cfg(_data(tmp_path, n=6), steps=5), calib_ids=calib, progress=False)


def test_too_few_distillation_windows_name_max_examples():
    """Without data, distillation trains on max_examples windows: 'add data' was no fix (trial)."""
    from losa.pipelines.losa.config import check_finetune_size

    cfg = LoSAConfig(steps=2, max_examples=3, finetune={"distill": True, "batch_size": 4})
    with pytest.raises(LosaError, match=r"^distillation has 3 examples .* too few for 2 steps × batch size 4; raise "
                                        r"max_examples \(--max-examples\) to at least 8, or lower"):
        check_finetune_size(3, cfg)


def _owl_ratios_by_hand(model, calib, m: float) -> list[float]:
    """OWL outlier ratio of every decoder layer of a dense model, computed independently of losa: inputs
    captured with forward hooks on the whole-model forward, Wanda scores |W_ij|·‖X_j‖₂, the fraction of a
    layer's scores above m × their mean."""
    inputs: dict[torch.nn.Module, torch.Tensor] = {}
    handles = [mod.register_forward_hook(lambda mod, a, _o: inputs.__setitem__(mod, a[0].detach()))
               for layer in get_decoder_layers(model) for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
    with torch.no_grad():
        model(calib)
    for h in handles:
        h.remove()
    ratios = []
    for layer in get_decoder_layers(model):
        scores = [(mod.weight.double().abs() * inputs[mod].double().reshape(-1, mod.in_features).norm(dim=0)).reshape(-1)
                  for mod in layer.modules() if isinstance(mod, torch.nn.Linear)]
        s = torch.cat(scores)
        ratios.append(float((s > m * s.mean()).double().mean()))
    return ratios


def test_owl_mixed_nm_ranks_layers_by_their_outlier_ratios(tiny_model, calib):
    """Mixed N:M with OWL: at step 1 (dense weights) the layer with the highest outlier ratio (computed by
    hand) gets N+1 and the lowest N-1 (nm_max_pairs=1); every step applies per-layer N:M with the exact
    mean N."""
    model = tiny_model("llama", seed=0, layers=4, hidden=32)
    ratios = _owl_ratios_by_hand(tiny_model("llama", seed=0, layers=4, hidden=32), calib, m=2.0)
    assert len(set(ratios)) == 4  # distinct, so the ranking is unambiguous
    rep = run(model, CharTokenizer(), LoSAConfig(nm="2:4", mixed_nm=True, nm_max_pairs=1, allocator="owl",
                                                 owl_m=2.0, steps=2,
                                                 nsamples=4, seqlen=16, recon_nsamples=2, r_min=1, r_max=8,
                                                 omega_first=4, omega_last=4, device="cpu"),
              calib_ids=calib, progress=False)
    first = [round(4 * (1 - s)) for s in rep.steps[0].layer_target_sparsity]
    want = [2] * 4
    want[max(range(4), key=ratios.__getitem__)] = 3
    want[min(range(4), key=ratios.__getitem__)] = 1
    assert first == want
    last = rep.steps[-1]
    ns = [round(4 * (1 - s)) for s in last.layer_target_sparsity]
    assert sorted(ns) == [1, 2, 2, 3]  # one pair moved (nm_max_pairs=1), mean N exactly 2
    for i, layer in enumerate(get_decoder_layers(model)):
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                groups = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 4).sum(-1)
                assert int(groups.max()) <= ns[i]
    assert rep.results.sparsity == pytest.approx(0.5, abs=1e-9)


def test_reconstruction_errors_match_hidden_states(tmp_path, tiny_model, calib):
    from losa.pipelines.losa.recon import DenseTargets, reconstruction_errors

    dense = tiny_model("llama", seed=0, layers=3, hidden=32)
    targets = DenseTargets.compute(dense, calib, tmp_path / "t.npy", batch_size=3)
    assert max(reconstruction_errors(dense, calib, targets, batch_size=2)) < 1e-4  # only bf16 storage rounding
    sparse = tiny_model("llama", seed=0, layers=3, hidden=32)
    with torch.no_grad():
        sparse.model.layers[1].mlp.down_proj.weight.mul_(torch.rand(32, 64, generator=torch.Generator().manual_seed(1)) > 0.5)
    got = reconstruction_errors(sparse, calib, targets)
    with torch.no_grad():  # independent: HF hidden_states[i + 1] is layer i's output (except the last, normed)
        hd = dense(calib, output_hidden_states=True).hidden_states
        hs = sparse(calib, output_hidden_states=True).hidden_states
    for i in range(2):
        ref = float((hd[i + 1] - hs[i + 1]).square().sum() / hd[i + 1].square().sum())
        assert got[i] == pytest.approx(ref, rel=0.02, abs=1e-4)
    assert got[0] < 1e-4 and got[1] > 20 * got[0]  # layer 0 untouched, layer 1 perturbed


def test_mixed_nm_unequal_layer_sizes_warns_and_falls_back_uncapped():
    """The default cap on moved layers needs equal layer sizes; with unequal sizes (and no explicit
    nm_max_pairs) the step targets fall back to the uncapped allocation, with a warning, and the
    size-weighted mean N stays exact."""
    from losa.pipelines.losa.loop import _step_targets

    cfg = LoSAConfig(nm="4:8", mixed_nm=True, steps=1, nsamples=4, seqlen=16, recon_nsamples=2, device="cpu")
    sizes = [100, 100, 200, 200]
    cka = np.array([[1.0, 0.9, 0.2, 0.3], [0.9, 1.0, 0.3, 0.2], [0.2, 0.3, 1.0, 0.4], [0.3, 0.2, 0.4, 1.0]])
    with pytest.warns(UserWarning, match="different sizes"):
        targets, sparsities, ns = _step_targets(cfg, 1, sizes, cka, None)
    assert sum(n * s for n, s in zip(ns, sizes)) == 4 * sum(sizes)  # exact weighted mean N
    assert all(abs(n - 4) <= cfg.nm_max_dev for n in ns)
    assert sum(n != 4 for n in ns) >= 2  # the uncapped optimum moves layers (the cap would move 0 here)
    assert [t.m for t in targets] == [8] * 4 and sparsities == [1 - n / 8 for n in ns]
    # with equal sizes the default cap applies: floor(delta*M*L/2) = 0 pairs at the default delta, so
    # nothing moves, and the user is told so in one line that names the flag
    with pytest.warns(UserWarning, match=r"lets no layer move, so this run is uniform 4:8; set nm_max_pairs \(--nm-max-pairs\)") as w:
        _, _, capped = _step_targets(cfg, 1, [100] * 4, cka, None)
    assert capped == [4, 4, 4, 4] and "\n" not in str(w[0].message)
    with warnings.catch_warnings():  # an explicit cap that moves layers: no warning
        warnings.simplefilter("error")
        _, _, moved = _step_targets(cfg.model_copy(update={"nm_max_pairs": 1}), 1, [100] * 4, cka, None)
    assert sorted(moved) == [3, 4, 4, 5]


def test_mixed_nm_keeps_its_allocation_across_steps_and_a_resume(tmp_path, tiny_model, calib, monkeypatch):
    """Each layer's N is allocated at step 1 and kept, also by a run resumed after a kill; the merged model
    holds exactly the mean N (a layer whose N rose later could not regrow its pruned weights)."""
    runmod = importlib.import_module("losa.pipelines.losa.loop")
    cfg = LoSAConfig(nm="2:4", mixed_nm=True, nm_max_pairs=1, allocator="owl", owl_m=2.0, steps=3, nsamples=4,
                     seqlen=16, recon_nsamples=2, r_min=1, r_max=8, omega_first=4, omega_last=4, device="cpu")
    real, calls = runmod.LoSARun._errors, {"n": 0}

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed in step 2, after step 1 was saved
        return real(self)

    monkeypatch.setattr(runmod.LoSARun, "_errors", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model("llama", seed=0, layers=4, hidden=32), CharTokenizer(), cfg, out_dir=tmp_path / "r",
            calib_ids=calib, progress=False)
    monkeypatch.setattr(runmod.LoSARun, "_errors", real)
    rep = run(tiny_model("llama", seed=0, layers=4, hidden=32), CharTokenizer(), cfg, out_dir=tmp_path / "r",
              resume=True, calib_ids=calib, progress=False)
    ns = [[round(4 * (1 - s)) for s in step.layer_target_sparsity] for step in rep.steps]
    assert len(ns) == 3 and ns[0] == ns[1] == ns[2] and sorted(ns[0]) == [1, 2, 2, 3]
    assert rep.results.sparsity == pytest.approx(0.5, abs=1e-9)


def test_recon_nsamples_default_follows_a_small_calibration_set():
    """The README's LoSA example runs with --nsamples 8: the default of 16 reconstruction windows is capped at
    the calibration windows (the trial's copy of it failed); a value the user sets above them is refused."""
    assert LoSAConfig(nsamples=8).recon_nsamples == 8 and LoSAConfig().recon_nsamples == 16
    with pytest.raises(LosaError, match=r"recon_nsamples \(--recon-nsamples\) 12 > nsamples \(--nsamples\) 8"):
        LoSAConfig(nsamples=8, recon_nsamples=12)


def test_owl_band_narrows_at_an_early_step_below_lambda():
    """S=0.5, T=20: S_1 = 0.5 - 0.5 * 0.95^3 ≈ 0.0713 is below owl_lambda 0.08, which OWL's symmetric band cannot
    span (a layer would go below 0); that step's band is S_1 wide, its layers in [0, 2 S_1], mean S_1."""
    from losa.pipelines.losa.loop import _step_targets

    cfg = LoSAConfig(allocator="owl", steps=20, sparsity=0.5, nsamples=4, seqlen=16, recon_nsamples=2, device="cpu")
    s1 = 0.5 - 0.5 * (1 - 1 / 20) ** 3
    sizes = [100, 100, 200]
    _, s, _ = _step_targets(cfg, 1, sizes, None, [0.01, 0.05, 0.03])
    assert min(s) == pytest.approx(0.0, abs=1e-12) and max(s) <= 2 * s1 + 1e-12  # least outliers: most pruned
    assert sum(x * n for x, n in zip(s, sizes)) / sum(sizes) == pytest.approx(s1)
    _, s, _ = _step_targets(cfg, 20, sizes, None, [0.01, 0.05, 0.03])  # the last step keeps the full band
    assert max(s) == pytest.approx(0.58) and sum(x * n for x, n in zip(s, sizes)) / sum(sizes) == pytest.approx(0.5)


@pytest.mark.parametrize("fields, message", [
    ({"allocator": "rmi", "delta": 0.6}, r"delta \(--delta\) 0\.6 lets a layer reach sparsity 1\.1 around the 0\.5 "
                                         r"target: every layer must stay below 1; use delta \(--delta\) below 0\.5"),
    ({"allocator": "owl", "owl_lambda": 0.6}, r"owl_lambda \(--owl-lambda\) 0\.6 spans -0\.1 to 1\.1 around the 0\.5 "
                                              r"target: OWL's band must stay inside \[0, 1\); use owl_lambda "
                                              r"\(--owl-lambda\) below 0\.5"),
    ({"allocator": "owl", "owl_lambda": 0.3, "sparsity": 0.7}, r"below 0\.3"),
    ({"allocator": "owl", "owl_lambda": 0.3, "sparsity": 0.2}, r"spans -0\.1 to 0\.5 .* use owl_lambda \(--owl-lambda\) "
                                                               r"at most 0\.2$"),
])
def test_a_band_that_leaves_0_1_is_refused_when_the_config_is_built(fields, message):
    from losa.pipelines.oneshot import PruneConfig

    for cls in (PruneConfig, LoSAConfig):
        with pytest.raises(LosaError, match=message):
            cls(**{"sparsity": 0.5, "nsamples": 4} | fields)
    PruneConfig(allocator="rmi", delta=0.49, sparsity=0.5)  # inside: fine
    LoSAConfig(allocator="owl", owl_lambda=0.3, sparsity=0.5, nsamples=4)
