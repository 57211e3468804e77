"""Mixture-of-experts families with fused 3-D expert tensors (transformers 5): every expert matrix is
pruned on its own, from exactly the tokens routed to it, counted by the sparsity report and saved fused.

Expectations are computed independently of losa: routing from the router logits with top-k, sparsity
and N:M patterns counted on the fused 3-D parameters themselves."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_tokenizer

import losa
from losa.errors import LosaError, SparsityVerificationError
from losa.export.verify import sparsity_report, verify_targets
from losa.models import ArchSpec, get_arch, linear_modules, unfused_experts
from losa.models import registry as reg
from losa.models.experts import UnfusedExperts
from losa.pipelines.oneshot import PruneVisitor
from losa.pruning.base import get_pruner
from losa.pruning.target import Target

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
E, INTER, HIDDEN, TOP_K = 4, 32, 64, 2


def make_moe(model_type: str, seed: int = 0, experts_implementation: str = "eager"):
    """A tiny random MoE causal LM (4 experts, top-2, 2 layers; qwen2_moe's layer 1 is a dense MLP)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=TOP_K, max_position_embeddings=256, head_dim=16,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "mixtral":
        kw.update(num_local_experts=E)
    else:
        kw.update(num_experts=E, moe_intermediate_size=INTER)
    if model_type == "qwen2_moe":
        kw.update(shared_expert_intermediate_size=48, mlp_only_layers=[1])
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.set_experts_implementation(experts_implementation)
    return model


def calib_ids(n: int = 4, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def moe_layers(model):
    """(index, fused experts module) of every decoder layer that has routed experts."""
    return [(i, layer.mlp.experts) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def expert_slices(experts) -> dict[str, torch.Tensor]:
    """The 3·E expert matrices read straight from the fused parameters."""
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    out = {}
    for e in range(gu.shape[0]):
        out[f"{e}.gate_proj"] = gu[e, :INTER]
        out[f"{e}.up_proj"] = gu[e, INTER:]
        out[f"{e}.down_proj"] = dn[e]
    return out


def moe_inputs(model, ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """The hidden states entering layer ``layer``'s MoE block, ``[tokens, H]`` (a test-side hook)."""
    got = []
    h = model.model.layers[layer].mlp.register_forward_pre_hook(lambda m, a: got.append(a[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        h.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got])


def routed(model, x: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """``[tokens, E]`` bool: which experts each token is routed to (top-k of the router logits)."""
    logits = x @ model.model.layers[layer].mlp.gate.weight.detach().t()
    top = logits.topk(TOP_K, dim=-1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)


def assert_no_hooks(model):
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, f"hook left on {name}"
        assert "forward" not in vars(mod), f"patched forward left on {name}"


# ------------------------------------------------------------------------------------------ (a) unfused forward
@pytest.mark.parametrize("family", FAMILIES)
def test_unfused_forward_equals_the_fused_forward(family):
    model = make_moe(family)
    ids = calib_ids()
    fused = {i: ex for i, ex in moe_layers(model)}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        want = model(ids).logits
        with unfused_experts(model):
            layer0 = model.model.layers[0]
            assert isinstance(layer0.mlp.experts, UnfusedExperts)
            names = linear_modules(layer0, get_arch(model))
            for e in range(E):
                for p in ("gate_proj", "up_proj", "down_proj"):
                    assert f"mlp.experts.{e}.{p}" in names
            assert names["mlp.experts.2.up_proj"].weight.shape == (INTER, HIDDEN)
            assert names["mlp.experts.2.down_proj"].weight.shape == (HIDDEN, INTER)
            got = model(ids).logits
        after = model(ids).logits
    assert torch.equal(got, want)  # same arithmetic as the eager fused forward, routing included
    assert torch.equal(after, want)
    for i, ex in moe_layers(model):
        assert ex is fused[i]  # the original modules are back
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    # the default (grouped_mm) implementation computes the same function
    model.set_experts_implementation("grouped_mm")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_expert_weights_are_folded_back_after_they_got_their_own_storage():
    model = make_moe("mixtral")
    with unfused_experts(model):
        model.double()  # like a move to another device: every expert linear now has its own storage
        ex = model.model.layers[1].mlp.experts
        with torch.no_grad():
            ex.expert(2).up_proj.weight.zero_()
            ex.expert(3).down_proj.weight.fill_(0.5)
    fused = model.model.layers[1].mlp.experts
    assert type(fused).__name__ == "MixtralExperts" and fused.gate_up_proj.dtype == torch.float64
    assert int((fused.gate_up_proj[2, INTER:] != 0).sum()) == 0 and int((fused.gate_up_proj[2, :INTER] == 0).sum()) == 0
    assert bool((fused.down_proj[3] == 0.5).all()) and not bool((fused.down_proj[2] == 0.5).any())


# ------------------------------------------------------------------------------------------ (b) per-expert targets
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", [
    {"method": "wanda", "sparsity": 0.5},
    {"method": "wanda", "nm": "2:4"},
    {"method": "magnitude", "sparsity": 0.5},
    {"method": "sparsegpt", "sparsity": 0.5, "sequential": "module"},
], ids=["wanda50", "wanda2:4", "magnitude50", "sparsegpt50-module"])
def test_prune_reaches_the_target_on_every_expert_slice(family, recipe):
    model = make_moe(family)
    report = losa.prune(model, None, recipe, calib_ids=calib_ids(), progress=False)
    layers = moe_layers(model)
    assert layers and all(type(ex).__name__.endswith("Experts") for _, ex in layers)  # fused again
    for i, ex in layers:
        for name, w in expert_slices(ex).items():
            if "nm" in recipe:
                groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
                assert int(groups.max()) <= 2, f"layer {i} expert {name} violates 2:4"
                assert int((w == 0).sum()) == w.numel() // 2
            else:
                # gate and up are separate matrices: each holds exactly half zeros (exact targets)
                assert int((w == 0).sum()) == round(w.numel() * 0.5), f"layer {i} expert {name}"
            full = f"model.layers.{i}.mlp.experts.{name}"
            assert report.sparsity.modules[full].shape == list(w.shape)
            assert report.sparsity.modules[full].zeros == int((w == 0).sum())
    n_experts = sum(3 * E for _ in layers)
    assert sum(".experts." in k for k in report.sparsity.modules) == n_experts


def test_report_counts_fused_experts_and_verification_fails_if_one_is_dense():
    model = make_moe("mixtral")
    dense = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    losa.prune(model, None, {"method": "wanda", "sparsity": 0.5}, calib_ids=calib_ids(), progress=False)
    targets = [Target(sparsity=0.5)] * 2
    verify_targets(sparsity_report(model), targets)  # passes on the re-fused model
    with torch.no_grad():
        model.model.layers[1].mlp.experts.gate_up_proj[2, INTER:] = dense[2, INTER:]  # expert 2's up: dense again
    rep = sparsity_report(model)
    assert rep.modules["model.layers.1.mlp.experts.2.up_proj"].zeros == 0
    with pytest.raises(SparsityVerificationError, match=r"model\.layers\.1\.mlp\.experts\.2\.up_proj: 0\.0000"):
        verify_targets(rep, targets)


# ------------------------------------------------------------------------------------------ (c) routed statistics
class StatsRecorder(PruneVisitor):
    """Keeps a copy of every expert statistic of layer 0 before pruning."""

    def visit(self, ctx):
        if ctx.index == 0:
            self.seen_stats = {n: (s.sq_norm.clone(), s.tokens) for n, s in ctx.stats.items()}
        super().visit(ctx)


@pytest.mark.parametrize("family", FAMILIES)
def test_wanda_statistics_of_an_expert_are_exactly_its_routed_tokens(family):
    model = make_moe(family)
    ids = calib_ids(n=6)
    x = moe_inputs(model, ids)  # layer 0's MoE input is the same in the unpruned and the pruning run
    route = routed(model, x)
    experts = model.model.layers[0].mlp.experts
    act = experts.act_fn
    slices = {k: v.clone() for k, v in expert_slices(experts).items()}
    rec = StatsRecorder(get_pruner("wanda"), [Target(sparsity=0.5)] * 2)
    losa.prune(model, None, {"method": "wanda", "sparsity": 0.5, "sequential": "layer", "calib_batch_size": 2},
               calib_ids=ids, progress=False, visitor=rec)
    for e in range(E):
        xe = x[route[:, e]].double()
        assert len(xe) > 0
        for p in ("gate_proj", "up_proj"):
            sq, tokens = rec.seen_stats[f"mlp.experts.{e}.{p}"]
            assert tokens == len(xe)
            torch.testing.assert_close(sq, xe.square().sum(0), rtol=1e-5, atol=1e-6)
        xf = x[route[:, e]]
        hidden = act(xf @ slices[f"{e}.gate_proj"].t()) * (xf @ slices[f"{e}.up_proj"].t())
        sq, tokens = rec.seen_stats[f"mlp.experts.{e}.down_proj"]
        assert tokens == len(xe)
        torch.testing.assert_close(sq, hidden.double().square().sum(0), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ (d) idle experts
def starve_expert(model, expert: int = 3, feature: int = 5) -> None:
    """Make layer 0 never route a token to ``expert``: every token's feature ``feature`` is large and
    positive (embedding column), only the router row of ``expert`` weighs it, strongly negative."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, feature] = 1.0
        gate = model.model.layers[0].mlp.gate.weight
        gate[:, feature] = 0.0
        gate[expert] = 0.0
        gate[expert, feature] = -10.0


@pytest.mark.parametrize("method,sequential", [("wanda", "layer"), ("sparsegpt", "module")])
def test_an_idle_expert_is_pruned_by_magnitude_with_a_warning(method, sequential):
    model = make_moe("mixtral")
    starve_expert(model)
    ids = calib_ids()
    route = routed(model, moe_inputs(model, ids))
    assert not route[:, 3].any() and route[:, :3].any(0).all()  # expert 3 idle, the others busy
    original = {k: v.clone() for k, v in expert_slices(model.model.layers[0].mlp.experts).items()}
    with pytest.warns(UserWarning, match=r"decoder layer 0: 1 expert\(s\) got no calibration tokens "
                                         rf"\(mlp\.experts\.3\); their 3 matrices were pruned by magnitude instead of {method}"):
        losa.prune(model, None, {"method": method, "sparsity": 0.5, "sequential": sequential}, calib_ids=ids,
                   progress=False)
    after = expert_slices(model.model.layers[0].mlp.experts)
    for p in ("gate_proj", "up_proj", "down_proj"):
        w0, w = original[f"3.{p}"], after[f"3.{p}"]
        keep = torch.zeros(w0.numel(), dtype=torch.bool)
        keep[w0.abs().reshape(-1).topk(w0.numel() // 2).indices] = True  # the largest |W| of the matrix
        assert torch.equal(w.reshape(-1) != 0, keep), p
        assert torch.equal(w.reshape(-1)[keep], w0.reshape(-1)[keep])


def test_a_losa_run_names_idle_experts_as_prune_does(tmp_path):
    """LoSA's pruning step counted an idle expert's matrices as experts ("3 expert(s) … (mlp.experts.3.gate_proj,
    …); their 3 matrices", trial): it names the expert once, as losa.prune does."""
    model = make_moe("mixtral")
    starve_expert(model)
    with pytest.warns(UserWarning) as seen:
        losa.run(model, None, {"sparsity": 0.5, "steps": 1, "device": "cpu", "nsamples": 4, "seqlen": 16,
                               "recon_nsamples": 2}, calib_ids=calib_ids(), progress=False)
    idle = [str(w.message) for w in seen if str(w.message).startswith("decoder layer 0:")]  # layer 1 routes freely
    assert idle and set(idle) == {"decoder layer 0: 1 expert(s) got no calibration tokens (mlp.experts.3); their 3 "
                                  "matrices were pruned by magnitude instead of wanda"}


# ------------------------------------------------------------------------------------------ (e) save / reload
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_pruned_checkpoint_reloads_with_its_zeros(tmp_path, family):
    from transformers import AutoModelForCausalLM

    model = make_moe(family)
    losa.prune(model, None, {"method": "wanda", "nm": "2:4"}, calib_ids=calib_ids(), progress=False)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    want = dict(model.named_parameters())
    for name, p in again.named_parameters():
        assert torch.equal(p, want[name]), name
    for (_, ex), (_, ex2) in zip(moe_layers(model), moe_layers(again)):
        assert ex2.gate_up_proj.ndim == 3 and torch.equal(ex2.gate_up_proj == 0, ex.gate_up_proj == 0)
    rep = sparsity_report(again, (2, 4))
    assert all(m.nm_ok for m in rep.modules.values())


# ------------------------------------------------------------------------------------------ (f) refusals
def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_a_family_registered_without_its_experts_is_refused(monkeypatch):
    monkeypatch.setitem(reg._REGISTRY, "mixtral", ArchSpec("mixtral-attention-only", ("mixtral",)))
    model = make_moe("mixtral")
    with pytest.raises(LosaError, match=r"^architecture 'mixtral-attention-only': its experts cannot be pruned yet") as exc:
        losa.prune(model, None, {"method": "wanda"}, calib_ids=calib_ids(), progress=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in _one_line(exc)
    assert not any(isinstance(m, UnfusedExperts) for m in model.modules())
    assert int((model.model.layers[0].self_attn.q_proj.weight == 0).sum()) == 0  # nothing was pruned


def test_a_non_standard_expert_layout_is_refused():
    model = make_moe("qwen3_moe")
    model.model.layers[1].mlp.experts.is_transposed = True  # e.g. a family storing [E, H, 2I]
    with pytest.raises(LosaError, match=r"^architecture 'qwen3_moe': its experts cannot be pruned yet .*"
                                        r"is_transposed=True") as exc:
        losa.prune(model, None, {"method": "magnitude"}, progress=False)
    _one_line(exc)
    with pytest.raises(LosaError, match="its experts cannot be pruned yet"):
        sparsity_report(model)


def test_an_unregistered_moe_family_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("phimoe", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                               num_experts_per_tok=2, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(LosaError, match=r"^mixture-of-experts family 'phimoe' is not supported: its experts cannot "
                                        r"be pruned yet; supported MoE families: mixtral, qwen2_moe, qwen3_moe$") as exc:
        losa.prune(model, None, {"method": "magnitude"}, progress=False)
    _one_line(exc)


# ------------------------------------------------------------------------------------------ (g) hooks, errors, LoSA
def test_no_hook_or_unfused_module_survives_prune_or_a_failing_visitor():
    ids = calib_ids()
    for method, sequential in (("wanda", "layer"), ("sparsegpt", "module")):
        model = make_moe("qwen2_moe")
        losa.prune(model, None, {"method": method, "sparsity": 0.5, "sequential": sequential}, calib_ids=ids,
                   progress=False)
        assert_no_hooks(model)

    class Boom(PruneVisitor):
        def visit_module(self, index, name, mod, stat):
            if name == "mlp.experts.1.up_proj":
                raise RuntimeError("boom")
            super().visit_module(index, name, mod, stat)

    model = make_moe("mixtral")
    fused = model.model.layers[0].mlp.experts
    with pytest.raises(RuntimeError, match="boom"):
        losa.prune(model, None, {"method": "sparsegpt", "sparsity": 0.5, "sequential": "module"}, calib_ids=ids,
                   progress=False, visitor=Boom(get_pruner("sparsegpt"), [Target(sparsity=0.5)] * 2))
    assert model.model.layers[0].mlp.experts is fused
    assert not any(isinstance(m, UnfusedExperts) for m in model.modules())
    assert_no_hooks(model)


def test_losa_run_prunes_and_adapts_every_expert(tmp_path):
    model = make_moe("mixtral")
    teacher = copy.deepcopy(model)
    data = tmp_path / "ft.jsonl"
    data.write_text("\n".join('{"text": "' + " ".join(f"word{(i + j) % 90}" for j in range(20)) + '"}'
                              for i in range(8)))
    report = losa.run(model, make_tiny_tokenizer(), {"sparsity": 0.5, "steps": 1, "nsamples": 4, "seqlen": 16,
                                                      "recon_nsamples": 2, "calib": "c4", "finetune_data": str(data),
                                                      "finetune": {"batch_size": 4, "max_length": 24}},
                      calib_ids=calib_ids(), progress=False)
    assert report.results.sparsity == pytest.approx(0.5, abs=0.01)
    assert_no_hooks(model)
    for (i, ex), (_, dense) in zip(moe_layers(model), moe_layers(teacher)):
        assert type(ex).__name__ == "MixtralExperts"
        dense_slices = expert_slices(dense)
        for name, w in expert_slices(ex).items():
            s = float((w == 0).float().mean())
            assert abs(s - report.results.layer_target_sparsity[i]) <= 1.0 / w.shape[1] + 1e-6, (i, name, s)
            kept = w != 0
            # Wanda keeps weights as they are: a kept weight that moved comes from the expert's merged adapter
            assert (w[kept] != dense_slices[name][kept]).any(), (i, name)


# ------------------------------------------------------------------------------------------ sparse inference
def test_sparse_inference_counts_converts_and_saves_every_expert(tmp_path):
    from losa.inference import SparseLinear, load_sparse, save_sparse, sparsify_for_inference

    model = make_moe("qwen2_moe")
    losa.prune(model, None, {"method": "magnitude", "sparsity": 0.5}, progress=False)
    ids = calib_ids(n=1, seqlen=8)
    with torch.no_grad():
        want = model(ids).logits
    n_modules = len(sparsity_report(model).modules)  # 4 attention + 3 shared expert + 12 experts, + 7 dense
    summary = sparsify_for_inference(model)
    assert summary["replaced"] == n_modules and summary["kept_dense"] == 0
    assert isinstance(model.model.layers[0].mlp.experts.get_submodule("3.down_proj"), SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=1e-5, atol=1e-5)
    path = save_sparse(model, tmp_path / "sparse.safetensors")
    fresh = make_moe("qwen2_moe", seed=7)  # fused, other weights
    load_sparse(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
