"""Perplexity with the standard protocol: tokenize the joined test text once, cut it into
non-overlapping windows of ``seqlen`` tokens, and take exp of the mean next-token NLL."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from losa.data.sources import eval_text
from losa.errors import LosaError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  #: mean token NLL (nats)
    windows: int
    tokens: int  #: predicted tokens
    seqlen: int

    def as_dict(self) -> dict:
        return self.__dict__.copy()


@torch.no_grad()
def perplexity_from_ids(model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
                        batch_size: int = 1, progress: bool = True, desc: str = "perplexity") -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream ``ids``."""
    if seqlen < 2:
        raise LosaError(f"seqlen must be >= 2, got {seqlen}")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise LosaError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        "use a shorter --seqlen")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    count = 0
    try:
        for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    mean = total / count
    if not math.isfinite(mean):
        raise LosaError("perplexity is not finite (NaN/inf logits); the model is broken, check its weights")
    return PerplexityResult(math.exp(mean), mean, n, count, seqlen)


def perplexity(model, tokenizer, dataset: str = "wikitext2", seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, data_dir: str | os.PathLike | None = None, progress: bool = True,
               return_details: bool = False) -> float | PerplexityResult:
    """Perplexity on ``dataset`` (wikitext2/c4/ptb or a local text file)."""
    if tokenizer is None:
        raise LosaError("perplexity needs a tokenizer; load the model with one")
    text = eval_text(dataset, data_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if dataset == "c4":  # the usual C4 protocol evaluates the first 256 windows
        max_windows = 256 if max_windows is None else min(256, max_windows)
    res = perplexity_from_ids(model, ids, seqlen, max_windows, batch_size, progress, desc=f"ppl {dataset}")
    return res if return_details else res.ppl
