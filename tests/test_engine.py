"""The layer-sequential engine: propagation, statistics, per-layer targets on every family."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_FAMILIES, make_tiny_model

import losa
from losa.calib.engine import LayerwiseEngine
from losa.calib.visitor import LayerVisitor
from losa.models.linear import get_weight
from losa.models.registry import get_decoder_layers
from losa.pruning.stats import InputNormStat
from losa.utils.config import build_config


class Recorder(LayerVisitor):
    """Records layer inputs/outputs and q/first-linear input norms without modifying anything."""

    def __init__(self):
        self.inputs, self.outputs, self.norms = [], [], []

    def stats_for(self, index, linears):
        name = next(iter(linears))
        self.first = name
        return {name: InputNormStat(get_weight(linears[name]).shape[1])}

    def visit(self, ctx):
        self.inputs.append(torch.cat(ctx.inputs))
        self.outputs.append(torch.cat(ctx.outputs))
        self.norms.append(ctx.stats[self.first].sq_norm.clone())


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "gemma2", "phi3"])
def test_engine_matches_full_forward(family):
    model = make_tiny_model(family, layers=3)
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    rec = Recorder()
    LayerwiseEngine(model, ids, batch_size=2, progress=False).run(rec)
    for i in range(3):
        torch.testing.assert_close(rec.inputs[i], hs[i], rtol=1e-4, atol=1e-5)
    # the last hidden state is after the final norm in HF; compare the layer outputs of 0..1 instead
    for i in range(2):
        torch.testing.assert_close(rec.outputs[i], hs[i + 1], rtol=1e-4, atol=1e-5)


def test_engine_stats_equal_hand_computed_norms():
    model = make_tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (4, 8), generator=torch.Generator().manual_seed(2))
    rec = Recorder()
    LayerwiseEngine(model, ids, progress=False).run(rec)
    layer0 = get_decoder_layers(model)[0]
    with torch.no_grad():
        x = layer0.input_layernorm(rec.inputs[0])  # q_proj's input is the normed hidden state
    torch.testing.assert_close(rec.norms[0], x.reshape(-1, x.shape[-1]).double().square().sum(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_prune_every_family_per_layer_targets(family, method):
    model = make_tiny_model(family, layers=2)
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    rep = losa.prune(model, None, losa.PruneConfig(method=method, sparsity=[0.3, 0.6]), calib_ids=ids,
                     progress=False)
    for row, target in zip(rep.sparsity.layers, [0.3, 0.6]):
        assert abs(row.sparsity - target) < 0.02
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_prune_propagates_pruned_outputs():
    """Layer 2's statistics come from the pruned layer 1: pruning sequentially differs from pruning
    every layer with dense inputs."""
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    a = make_tiny_model("llama", layers=2)
    losa.prune(a, None, losa.PruneConfig(method="wanda", sparsity=0.6), calib_ids=ids, progress=False)
    rec = Recorder()
    b = make_tiny_model("llama", layers=2)
    LayerwiseEngine(b, ids, progress=False).run(rec)  # dense statistics
    w_seq = get_weight(get_decoder_layers(a)[1].self_attn.q_proj)
    # rebuild layer 1's Wanda mask from dense inputs: it must differ somewhere
    from losa.pruning import Target, get_pruner

    st = InputNormStat(64)
    st.sq_norm = rec.norms[1]
    dense_mask = get_pruner("wanda").prune(get_weight(get_decoder_layers(b)[1].self_attn.q_proj), st,
                                           Target(sparsity=0.6)).mask
    assert not torch.equal(w_seq != 0, dense_mask)


def test_mixed_nm_per_layer():
    model = make_tiny_model("llama", layers=2)
    ids = torch.randint(3, 128, (2, 16))
    rep = losa.prune(model, None, losa.PruneConfig(method="wanda", nm="2:8", nm_n=[3, 1]), calib_ids=ids,
                     progress=False)
    for name, m in rep.sparsity.modules.items():
        n = 3 if ".0." in name else 1
        w = get_weight(model.get_submodule(name))
        assert ((w != 0).reshape(w.shape[0], -1, 8).sum(-1) == n).all()
        assert m.nm_ok


def _wanda_mask_from_input(weight, x, sparsity):
    from losa.pruning import Target, get_pruner

    st = InputNormStat(weight.shape[1])
    st.update(x)
    return get_pruner("wanda").prune(weight, st, Target(sparsity=sparsity)).mask


def test_module_sequential_prunes_with_the_inputs_modules_really_get():
    """sequential='module': q/k/v (same input) match layer mode; o_proj's mask comes from the attention
    output of the already-pruned q/k/v, rebuilt here by hand."""
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    layer_m = make_tiny_model("llama", layers=1)
    module_m = make_tiny_model("llama", layers=1)
    dense = make_tiny_model("llama", layers=1)
    rep_l = losa.prune(layer_m, None, losa.PruneConfig(method="wanda", sparsity=0.6, sequential="layer"),
                       calib_ids=ids, progress=False)
    rep_m = losa.prune(module_m, None, losa.PruneConfig(method="wanda", sparsity=0.6, sequential="module"),
                       calib_ids=ids, progress=False)
    assert (rep_l.sequential, rep_m.sequential) == ("layer", "module")
    al, am, ad = (get_decoder_layers(m)[0].self_attn for m in (layer_m, module_m, dense))
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(al, name).weight, getattr(am, name).weight)
    # dense layer with module-mode q/k/v: the input o_proj sees in module mode
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(ad, name).weight.data.copy_(getattr(am, name).weight)
    seen = []
    h = ad.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        dense(ids)
    h.remove()
    expect = _wanda_mask_from_input(ad.o_proj.weight, seen[0], 0.6)
    assert torch.equal(am.o_proj.weight != 0, expect)
    assert not torch.equal(al.o_proj.weight != 0, am.o_proj.weight != 0)


def test_module_sequential_runs_each_layer_once_and_auto_picks_it():
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    # (mode, windows per batch, layer calls per layer, batches); "layer" with the default batch: one batch
    for method, sequential, batch, calls_per_layer, batches in (
            ("sparsegpt", "module", None, 1, 1), ("sparsegpt", "layer", None, 2, 1), ("sparsegpt", "auto", None, 1, 1),
            ("sparsegpt", "auto", 2, 4, 2), ("wanda", "auto", None, 2, 1), ("wanda", "module", None, 1, 1)):
        model = make_tiny_model("llama", layers=2)
        calls = []
        for layer in get_decoder_layers(model):
            layer.register_forward_pre_hook(lambda *_, c=calls: c.append(1))
        cfg = losa.PruneConfig(method=method, sparsity=0.5, sequential=sequential, calib_batch_size=batch)
        rep = losa.prune(model, None, cfg, calib_ids=ids, progress=False)
        assert len(calls) == 2 * calls_per_layer + batches, (sequential, batch, len(calls))  # + capture
        assert abs(rep.sparsity.overall - 0.5) < 0.01


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_statistics_pass_stops_after_the_last_linear_and_changes_nothing(family):
    """Layer mode: the statistics forward stops once every linear has seen its input (the last projection
    never computes there), and the masks equal those of a full statistics forward."""
    from losa.models.registry import linear_modules
    from losa.pipelines.oneshot import PruneVisitor
    from losa.pruning import Target, get_pruner

    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    weights = {}
    for needs_outputs in (True, False):
        model = make_tiny_model(family, layers=2)
        counts: dict[str, int] = {}
        for layer in get_decoder_layers(model):
            for name, mod in linear_modules(layer).items():
                mod.register_forward_hook(lambda *_, n=name, c=counts: c.__setitem__(n, c.get(n, 0) + 1))
        visitor = PruneVisitor(get_pruner("wanda"), [Target(sparsity=0.5)] * 2, needs_outputs=needs_outputs)
        losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5, sequential="layer",
                                                 calib_batch_size=2), calib_ids=ids, progress=False, visitor=visitor)
        weights[needs_outputs] = [p.detach().clone() for p in model.parameters()]
        # 2 layers x 2 batches x (statistics pass + propagation pass), minus the skipped last projections
        per_pass = 2 * 2
        full = sorted(n for n, c in counts.items() if c == 2 * per_pass)
        if needs_outputs:
            assert len(full) == len(counts)
        else:
            assert len(full) == len(counts) - 1 and min(counts.values()) == per_pass
    for a, b in zip(weights[True], weights[False]):
        assert torch.equal(a, b)


def test_bf16_statistics_pass_is_close_to_float32_and_only_in_layer_mode():
    """stats_precision=bfloat16: the statistics pass runs under autocast, the propagation does not; the
    masks differ from float32 statistics only at the margin."""
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    masks = {}
    for prec in ("model", "bfloat16"):
        model = make_tiny_model("llama", layers=2)
        rep = losa.prune(model, None, losa.PruneConfig(method="wanda", sparsity=0.5, stats_precision=prec),
                         calib_ids=ids, progress=False)
        assert rep.sequential == "layer" and rep.sparsity.overall == pytest.approx(0.5, abs=1e-3)
        masks[prec] = torch.cat([(p != 0).flatten() for n, p in model.named_parameters() if "proj" in n])
    agree = (masks["model"] == masks["bfloat16"]).float().mean().item()
    assert 0.97 < agree < 1.0
    with pytest.raises(losa.LosaError, match="stats_precision"):
        build_config(losa.PruneConfig, {"method": "sparsegpt", "stats_precision": "bfloat16", "sequential": "module"})
    # auto never picks module mode with a reduced statistics precision
    model = make_tiny_model("llama", layers=1)
    rep = losa.prune(model, None, losa.PruneConfig(method="sparsegpt", sparsity=0.5, stats_precision="bfloat16"),
                     calib_ids=ids, progress=False)
    assert rep.sequential == "layer"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "phi3"])
def test_single_pass_chunked_mlp_matches_the_plain_forward(monkeypatch, family):
    """Single-pass SparseGPT/Wanda with the gated MLP run in uneven token chunks gives the weights of the
    plain forward (the projections are still pruned from their whole inputs); families without a registered
    gated MLP (phi3) keep their own forward."""
    import contextlib

    import losa.calib.chunked_mlp as cm
    import losa.calib.engine as eng
    from losa.models.registry import get_arch

    ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(1))
    calls = []
    real = cm._chunked_forward
    monkeypatch.setattr(cm, "_chunked_forward", lambda *a: (calls.append(a[3]), real(*a))[1])
    monkeypatch.setattr(cm, "CHUNK_TOKENS", 7)  # 48 tokens -> six chunks of 7 and one of 6

    def pruned(method: str) -> dict[str, torch.Tensor]:
        model = make_tiny_model(family, layers=2)
        cfg = losa.PruneConfig(method=method, sparsity=0.5, sequential="module")
        assert losa.prune(model, None, cfg, calib_ids=ids, progress=False).sequential == "module"
        return {n: p.detach().clone() for n, p in model.named_parameters()}

    for method in ("sparsegpt", "wanda"):
        chunked = pruned(method)
        with monkeypatch.context() as m:
            m.setattr(eng, "chunked_gated_mlp", lambda *a, **k: contextlib.nullcontext(False))
            plain = pruned(method)
        for n, w in chunked.items():
            assert torch.equal(w == 0, plain[n] == 0), n
            torch.testing.assert_close(w, plain[n], rtol=1e-3, atol=1e-5)  # GEMM blocking differs by chunk
    registered = get_arch(make_tiny_model(family, layers=1)).gated_mlp is not None
    assert calls == ([7] * 4 if registered else [])  # 2 layers x 2 methods


def test_first_input_hooks_do_not_keep_statistics_alive():
    """act_on_first_input's seen-set refers to its step and back; leaving the context must break that cycle
    so a layer's statistics are freed at once (not at the next garbage collection)."""
    import gc
    import weakref

    from losa.calib.hooks import act_on_first_input

    lin = torch.nn.Linear(4, 3)
    stats = {"lin": InputNormStat(4)}
    ref = weakref.ref(stats["lin"])
    gc.disable()
    try:
        with act_on_first_input({"lin": lin}, stats, lambda *a: None) as seen:
            lin(torch.randn(2, 4))
            seen.prime("lin", lin, torch.randn(2, 4))  # already seen: no second update
        assert stats["lin"].tokens == 2 and seen == {"lin"}
        del stats, seen
        assert ref() is None
    finally:
        gc.enable()
