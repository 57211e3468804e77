"""benchmarks/bench_decode.py: the overhead-only mode really removes every weight-streaming layer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model

from losa.inference import SparseLinear, kernel_available, sparsify_for_inference
from losa.inference.decode import BF16LMHead, set_lm_head_dtype

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_decode  # noqa: E402


@pytest.mark.skipif(not kernel_available(), reason="needs the compiled sparse kernel")
def test_overhead_only_model_has_no_weight_layer_and_zero_logits() -> None:
    model = make_tiny_model("llama", hidden=64)
    bench_decode.prune_magnitude(model, 0.6)
    sparsify_for_inference(model, value_dtype="bfloat16")
    set_lm_head_dtype(model, "bfloat16")
    n_sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    assert n_sparse == 7 * len(model.model.layers) and isinstance(model.get_output_embeddings(), BF16LMHead)
    bench_decode.zero_weight_layers(model)
    assert not any(isinstance(m, (SparseLinear, BF16LMHead)) for m in model.modules())
    assert bench_decode.bytes_per_token(model) == 0
    ids = torch.randint(3, 100, (1, 5))
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, 5, model.config.vocab_size) and not logits.any()


def test_overhead_only_stand_in_keeps_its_inputs_work_when_compiled() -> None:
    """Inductor must not eliminate what feeds a stand-in layer (it did with a plain ``new_zeros``)."""
    from torch._inductor.utils import run_and_get_code

    class Block(torch.nn.Module):
        def __init__(self, stand_in: torch.nn.Module) -> None:
            super().__init__()
            self.layer = stand_in

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.layer(torch.tanh(x) * 3.0)  # tanh feeds only the stand-in

    class Folded(torch.nn.Module):  # the stand-in the overhead-only mode used before
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.new_zeros(x.shape)

    x = torch.randn(2, 8)
    torch._dynamo.reset()
    out, (code,) = run_and_get_code(torch.compile(Block(bench_decode._Zeros(8))), x)
    assert torch.equal(out, x) and "tanh" in code and "zeros_out" in code
    torch._dynamo.reset()
    _, (folded,) = run_and_get_code(torch.compile(Block(Folded())), x)
    assert "tanh" not in folded  # the check above can fail: a foldable stand-in loses its inputs' work
    torch._dynamo.reset()
