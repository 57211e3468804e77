"""The CUDA 2:4 decision (losa.inference.cuda24) on the CPU: which linears qualify, and that "auto" converts a
layer only when the timings it is given say the semi-structured form is faster at every batch, timing each shape
once. The conversion itself needs CUDA (tests/test_inference_model.py, skipped without it)."""

import pytest
import torch
from torch import nn

from losa.errors import LosaError
from losa.inference import cuda24


def linear_24(out_f: int, in_f: int, dtype=torch.float16, pattern=(1, 1, 0, 0)) -> nn.Linear:
    """A linear whose every group of 4 inputs keeps the positions where ``pattern`` is 1."""
    lin = nn.Linear(in_f, out_f, bias=False).to(dtype)
    keep = torch.tensor(pattern, dtype=torch.bool).repeat(out_f, in_f // 4)
    with torch.no_grad():
        lin.weight.mul_(keep)
    return lin


def test_qualifies_by_dtype_and_pattern():
    assert cuda24.qualifies(linear_24(8, 16))
    assert cuda24.qualifies(linear_24(8, 16, torch.bfloat16, (0, 1, 0, 1)))
    assert not cuda24.qualifies(linear_24(8, 16, torch.float32))  # no fp32 semi-structured weight
    assert not cuda24.qualifies(linear_24(8, 16, pattern=(1, 1, 1, 0)))  # 3 of 4 kept: not 2:4
    assert not cuda24.qualifies(nn.Conv1d(4, 4, 1).half())


def test_unknown_mode_is_one_line_error():
    with pytest.raises(LosaError, match="'fast' is not one of auto, always, never"):
        cuda24.SemiStructuredChooser("fast")
    from losa.inference import sparsify_for_inference

    with pytest.raises(LosaError, match="semi_structured"):
        sparsify_for_inference(nn.Sequential(linear_24(8, 16)), semi_structured="yes")


@pytest.mark.parametrize(("speedups", "converted"), [
    ({1: 0.07, 2048: 0.4}, False),  # slower at both batches (what the H200 measured)
    ({1: 0.5, 2048: 1.3}, False),  # faster for prompts only: a decode step would be slower
    ({1: 1.2, 2048: 0.9}, False),
    ({1: 1.0, 2048: 1.5}, False),  # a tie is not faster
    ({1: 1.1, 2048: 1.4}, True),
])
def test_auto_converts_only_when_faster_at_every_batch(monkeypatch, speedups, converted):
    done = []
    monkeypatch.setattr(cuda24, "convert", lambda m: done.append(m) or True)
    chooser = cuda24.SemiStructuredChooser("auto", measure=lambda w: speedups)
    lin = linear_24(8, 16)
    assert chooser.apply(lin) is converted
    assert done == ([lin] if converted else [])
    assert chooser.slower == (0 if converted else 1)


def test_auto_times_each_shape_once_and_fixed_modes_never(monkeypatch):
    monkeypatch.setattr(cuda24, "convert", lambda m: True)
    timed = []

    def measure(w):
        timed.append(tuple(w.shape))
        return {1: 2.0, 2048: 2.0}

    chooser = cuda24.SemiStructuredChooser("auto", measure=measure)
    layers = [linear_24(8, 16), linear_24(8, 16), linear_24(16, 8), linear_24(8, 16, torch.bfloat16)]
    assert all(chooser.apply(m) for m in layers)
    assert timed == [(8, 16), (16, 8), (8, 16)]  # the bf16 weight is a shape of its own dtype
    assert not chooser.apply(linear_24(8, 16, pattern=(1, 1, 1, 0)))  # not 2:4: neither timed nor counted slower
    assert len(timed) == 3 and chooser.slower == 0

    for mode, expect in (("always", True), ("never", False)):
        fixed = cuda24.SemiStructuredChooser(mode, measure=lambda w: pytest.fail("timed in a fixed mode"))
        assert fixed.apply(linear_24(8, 16)) is expect and fixed.slower == 0


def test_a_weight_pytorch_refuses_stays_dense_and_is_counted(monkeypatch):
    monkeypatch.setattr(cuda24, "convert", lambda m: False)  # what convert returns when torch raises
    chooser = cuda24.SemiStructuredChooser("always")
    assert not chooser.apply(linear_24(8, 16)) and chooser.refused == 1 and chooser.slower == 0


def test_auto_counts_a_weight_pytorch_refuses_as_refused_not_slower(monkeypatch):
    monkeypatch.setattr(cuda24, "convert", lambda m: pytest.fail("converted a refused weight"))
    chooser = cuda24.SemiStructuredChooser("auto", measure=lambda w: None)  # what measure_speedups returns then
    assert not chooser.apply(linear_24(8, 16)) and chooser.refused == 1 and chooser.slower == 0
