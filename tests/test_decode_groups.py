"""Layer groups in decode (losa.inference.groups): the kernel's spmm_group, finding q/k/v and gate/up, equal outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from losa.inference import SparseLinear, kernel_available, sparsify_for_inference
from losa.inference import kernel as K
from losa.inference.decode import LeanDecoder
from losa.inference.formats import FORMAT_CODES, pack, unpack
from losa.inference.groups import find_groups
from losa.models.linear import get_weight, set_weight
from losa.models.registry import get_decoder_layers, linear_modules

needs_kernel = pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel")
pytestmark = pytest.mark.usefixtures("no_measured_thresholds")


def _prune(model, sparsity: float = 0.6, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for layer in get_decoder_layers(model):
        for mod in linear_modules(layer).values():
            w = get_weight(mod)
            set_weight(mod, w * (torch.rand(w.shape, generator=gen) >= sparsity))


def _weight(n: int, k: int, fmt: str, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    if fmt == "2:4":  # keep the 2 largest of every 4 inputs
        g = w.view(n, k // 4, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
        return (g * keep).view(n, k)
    return w * (torch.rand(n, k, generator=gen) >= 0.65)


@needs_kernel
@pytest.mark.parametrize("isa", sorted({0, K.best_isa()} | ({1} if K.best_isa() >= 1 else set())),
                         ids=lambda i: K.ISA_NAMES[i])
@pytest.mark.parametrize("values", [torch.float32, torch.bfloat16], ids=["fp32-values", "bf16-values"])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_spmm_group_equals_each_weights_spmm_and_f_linear(isa, values, rows):
    """Stacked outputs of weights with their own formats, row counts and biases: bit for bit each weight's own
    spmm (the row loop is the same per row), and F.linear in float64 to float32 rounding."""
    gen = torch.Generator().manual_seed(rows)
    k = 72  # not a multiple of 32: the kernel pads the input
    shapes = [(40, "bitmask", True), (8, "2:4", False), (21, "bitmask", True)]
    ws = [_weight(n, k, fmt, gen) for n, fmt, _ in shapes]
    packs = [pack(w, values, "bitmask" if fmt == "bitmask" else "nm24") for w, (_, fmt, _) in zip(ws, shapes)]
    assert [p.fmt for p in packs] == ["bitmask", "nm24", "bitmask"]
    biases = [torch.randn(n, generator=gen) if has else None for n, _, has in shapes]
    stacked_bias = torch.cat([b if b is not None else torch.zeros(n) for (n, _, _), b in zip(shapes, biases)])
    x = torch.randn(rows, k, generator=gen)
    op, grp = K.spmm_op(), K.spmm_group_op()
    y = grp(x, [p.meta for p in packs], [p.values for p in packs], [p.row_ptr for p in packs], stacked_bias,
            [n for n, _, _ in shapes], k, [FORMAT_CODES[p.fmt] for p in packs], isa)
    own = torch.cat([op(x, p.meta, p.values, p.row_ptr, b, n, k, FORMAT_CODES[p.fmt], isa)
                     for p, b, (n, _, _) in zip(packs, biases, shapes)], 1)
    assert y.shape == (rows, sum(n for n, _, _ in shapes)) and y.dtype == torch.float32
    assert torch.equal(y, own)
    direct = K.load_kernel().spmm_group(x, [p.meta for p in packs], [p.values for p in packs],
                                        [p.row_ptr for p in packs], stacked_bias, [n for n, _, _ in shapes], k,
                                        [FORMAT_CODES[p.fmt] for p in packs], isa)  # the pybind binding
    assert torch.equal(direct, own)
    ref = torch.cat([F.linear(x.double(), unpack(p, torch.float64), None if b is None else b.double())
                     for p, b in zip(packs, biases)], 1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_spmm_group_rejects_mixed_value_dtypes_and_a_wrong_bias():
    gen = torch.Generator().manual_seed(0)
    a, b = pack(_weight(16, 32, "bitmask", gen), torch.float32), pack(_weight(16, 32, "bitmask", gen), torch.bfloat16)
    x, grp = torch.randn(1, 32), K.spmm_group_op()
    with pytest.raises(RuntimeError, match="one value dtype"):
        grp(x, [a.meta, b.meta], [a.values, b.values], [a.row_ptr, b.row_ptr], None, [16, 16], 32, [0, 0], 0)
    with pytest.raises(RuntimeError, match="one element per stacked row"):
        grp(x, [a.meta, a.meta], [a.values, a.values], [a.row_ptr, a.row_ptr], torch.zeros(16), [16, 16], 32,
            [0, 0], 0)


@needs_kernel
@pytest.mark.parametrize("family,expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"]]),
    ("opt", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]]),  # OPT's fc1 -> fc2 share nothing
])
def test_groups_are_the_layers_fed_the_same_input(family, expected):
    model = make_tiny_model(family, hidden=64, seed=1)
    _prune(model)
    sparsify_for_inference(model, value_dtype="bfloat16")
    prefix = {"llama": "model.layers", "opt": "model.decoder.layers"}[family]
    layers = len(get_decoder_layers(model))
    want = [[f"{prefix}.{i}.{n}" for n in g] for i in range(layers) for g in expected]
    assert find_groups(model) == want
    lean = LeanDecoder(model)
    assert lean.groups == len(want)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the dry run's hooks are gone


@needs_kernel
@pytest.mark.parametrize("family,dtype", [("llama", torch.float32), ("qwen2", torch.float32),
                                          ("qwen2", torch.bfloat16)], ids=["llama-fp32", "qwen2-bias-fp32",
                                                                           "qwen2-bias-bf16"])
def test_grouped_decode_gives_the_same_logits_and_makes_one_call_per_group(monkeypatch, family, dtype):
    """Logits equal bit for bit with and without groups (1-row steps, batch 2, a prompt, q/k/v biases, bf16
    activations); each 1-row step calls spmm_group once per group and the plain row loop for the rest."""
    model = make_tiny_model(family, hidden=64, seed=5)
    _prune(model, seed=4)
    model.to(dtype)
    sparsify_for_inference(model, value_dtype="bfloat16")
    ids = torch.randint(3, 128, (2, 17))
    LeanDecoder(model, group_siblings=False)
    assert all(m.decode_group is None for m in model.modules() if isinstance(m, SparseLinear))
    with torch.inference_mode():
        full = model(ids).logits
        steps = [model(ids[:, i:i + 1]).logits for i in range(3)]
    lean = LeanDecoder(model)
    assert lean.groups == 2 * len(get_decoder_layers(model))
    calls: list[int] = []
    real = K.load_kernel()

    class Counting:  # the extension module, counting its spmm_group calls
        def __getattr__(self, name):
            return getattr(real, name)

        def spmm_group(self, x, *a):
            calls.append(x.shape[0])
            return real.spmm_group(x, *a)

    counting = Counting()
    monkeypatch.setattr(K, "load_kernel", lambda: counting)
    with torch.inference_mode():
        assert torch.equal(model(ids[:, :1]).logits, steps[0])
        assert calls == [2] * lean.groups  # one call per group for the 2-row step
        for i in range(1, 3):
            assert torch.equal(model(ids[:, i:i + 1]).logits, steps[i])
        assert torch.equal(model(ids).logits, full)  # 34 rows: above the row loop, every layer alone
    assert len(calls) == 3 * lean.groups
    assert all(m.decode_group is None or m.decode_group[0].stash is None
               for m in model.modules() if isinstance(m, SparseLinear))  # nothing held after a forward


@needs_kernel
def test_a_member_called_alone_or_with_another_input_computes_its_own_output():
    model = make_tiny_model("llama", hidden=64, seed=3)
    _prune(model, seed=3)
    sparsify_for_inference(model, value_dtype="bfloat16")
    LeanDecoder(model)
    attn = get_decoder_layers(model)[0].self_attn
    x, other = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    with torch.inference_mode():
        alone = F.linear(other.double(), attn.k_proj.to_dense(torch.float64)).float()
        torch.testing.assert_close(attn.k_proj(other), alone, rtol=1e-5, atol=1e-5)  # no stash: computes itself
        q = attn.q_proj(x)  # the group's first member: stashes every member's output for x
        k = attn.k_proj(other)  # another input: not the stash
        torch.testing.assert_close(k, alone, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(q, F.linear(x.double(), attn.q_proj.to_dense(torch.float64)).float(),
                                   rtol=1e-5, atol=1e-5)


@needs_kernel
def test_compiled_decode_calls_spmm_group_and_keeps_greedy_tokens():
    from torch.profiler import profile

    model = make_tiny_model("llama", hidden=64, seed=5, layers=1)
    _prune(model)
    sparsify_for_inference(model, value_dtype="bfloat16")
    ids = torch.randint(3, 128, (1, 6))
    with torch.inference_mode():
        ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    lean = LeanDecoder(model, compile=True)
    with torch.inference_mode():
        lean.generate(ids, 5, do_sample=False, pad_token_id=0)  # compiles
        with profile() as prof:
            out = lean.generate(ids, 5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("losa_sparse_kernels::spmm_group", 0) >= 2 * 4  # 2 groups in each of the 4 decode steps
