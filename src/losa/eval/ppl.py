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
from losa.errors import NO_TOKENIZER_FIX, LosaError, option
from losa.models.offload import input_device
from losa.models.registry import check_window

#: how errors name the window length by default (:func:`losa.errors.option`)
SEQLEN = option("seqlen")


@dataclass
class PerplexityResult:
    """Perplexity and the numbers behind it.

    Args:
        ppl: perplexity, ``exp(nll)``.
        nll: mean next-token negative log-likelihood over the predicted tokens, in nats.
        windows: number of evaluated windows.
        tokens: number of predicted tokens (``windows · (seqlen − 1)``).
        seqlen: window length in tokens.
    Returns:
        The result (on construction).
    Raises:
        Nothing of its own.
    """

    ppl: float
    nll: float  #: mean token NLL (nats)
    windows: int
    tokens: int  #: predicted tokens
    seqlen: int

    def as_dict(self) -> dict:
        """The fields as a new dict.

        Args:
            None.
        Returns:
            ``{"ppl", "nll", "windows", "tokens", "seqlen"}`` -> value.
        Raises:
            Nothing of its own.
        """
        return self.__dict__.copy()


def check_max_windows(max_windows: int | None) -> None:
    """Check a window cap before any work (0 or a negative cap would evaluate nothing).

    Args:
        max_windows: the number of windows to evaluate at most, or None for all.
    Raises:
        LosaError: ``max_windows`` below 1.
    """
    if max_windows is not None and (isinstance(max_windows, bool) or not isinstance(max_windows, int)):
        raise LosaError(f"max_windows must be an int or None, got {max_windows!r}")
    if max_windows is not None and max_windows < 1:
        raise LosaError(f"max_windows must be at least 1, got {max_windows}; pass None to evaluate every window")


@torch.no_grad()
def perplexity_from_ids(model, ids: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
                        batch_size: int = 1, progress: bool = True, desc: str = "perplexity",
                        flag: str = SEQLEN) -> PerplexityResult:
    """Perplexity of ``model`` on a 1-D token stream ``ids``.

    The stream is cut into non-overlapping windows of ``seqlen`` tokens (the remainder is dropped);
    each window is scored on its own, without context from the previous one, so its first token is
    not predicted. The NLL (float32 logits) is averaged over all predicted tokens; since every
    window has ``seqlen − 1`` of them this equals the Wanda/SparseGPT protocol (mean of per-window
    losses). Runs under ``no_grad`` in eval mode on the device of the model's first parameter and
    restores the previous train/eval mode.

    Args:
        model: a causal LM returning ``.logits``.
        ids: token ids, ``[num_tokens]`` (int64).
        seqlen: window length in tokens (≥ 2).
        max_windows: evaluate at most this many windows (>= 1), from the start; None: all.
        batch_size: windows per forward.
        progress: show a progress bar.
        desc: progress bar label.
        flag: what sets ``seqlen``, named in errors (default ``seqlen (--seqlen)``; a command passes
            its own flag, e.g. ``--eval-seqlen``).
    Returns:
        A :class:`PerplexityResult`.
    Raises:
        LosaError: ``seqlen < 2`` or beyond the model's context, ``batch_size < 1``, ``max_windows < 1``,
            fewer tokens than one window, or a non-finite mean NLL.
    """
    if seqlen < 2:
        raise LosaError(f"seqlen must be >= 2, got {seqlen}")
    if batch_size < 1:
        raise LosaError(f"batch size must be >= 1 window, got {batch_size}; set {option('batch_size')} to 1 or "
                        "more")
    check_max_windows(max_windows)
    check_window(model, seqlen, "evaluation window", flag)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, int(max_windows))
    if n < 1:
        raise LosaError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}; "
                        f"use a shorter {flag}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = input_device(model)  # CPU for an offloaded model: its hooks move the ids
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
               return_details: bool = False, flag: str = SEQLEN) -> float | PerplexityResult:
    """Perplexity on ``dataset`` (wikitext2/c4/ptb or a local text file).

    The evaluation text (WikiText-2 test rows joined by blank lines, C4 validation / PTB test joined
    by spaces, or the file) is tokenised once and scored by :func:`perplexity_from_ids`; for C4 at
    most the first 256 windows are used, as in the SparseGPT/Wanda evaluation.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        dataset: ``wikitext2``, ``c4``, ``ptb`` or a ``.txt``/``.json``/``.jsonl`` path.
        seqlen: window length in tokens.
        max_windows: evaluate at most this many windows (>= 1); None: all.
        batch_size: windows per forward.
        data_dir: directory with local copies of the datasets (default: ``$LOSA_DATA_DIR``, else the HF hub).
        progress: show a progress bar.
        return_details: return the full :class:`PerplexityResult` instead of the float.
        flag: what sets ``seqlen``, named in errors (default ``seqlen (--seqlen)``; a command passes
            its own flag, e.g. ``--eval-seqlen``).
    Returns:
        The perplexity, or a :class:`PerplexityResult` with ``return_details``.
    Raises:
        LosaError: no tokenizer, model and tokenizer swapped or not a module, ``seqlen`` or ``max_windows`` not an
            int, ``max_windows < 1``, the dataset text cannot be found or read, or as
            :func:`perplexity_from_ids`.
    """
    if not isinstance(model, torch.nn.Module) or not callable(tokenizer):
        raise LosaError(f"perplexity takes (model, tokenizer, ...), got ({type(model).__name__}, "
                        f"{type(tokenizer).__name__}); pass what losa.load_model returns, in that order"
                        if tokenizer is not None else f"perplexity needs a tokenizer, and {NO_TOKENIZER_FIX}")
    if isinstance(seqlen, bool) or not isinstance(seqlen, int):
        raise LosaError(f"seqlen must be an int number of tokens, got {seqlen!r}")
    check_max_windows(max_windows)  # before reading and tokenising the text
    check_window(model, seqlen, "evaluation window", flag)  # before reading and tokenising the text
    text = eval_text(dataset, data_dir)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if dataset == "c4":  # the usual C4 protocol evaluates the first 256 windows
        max_windows = 256 if max_windows is None else min(256, max_windows)
    res = perplexity_from_ids(model, ids, seqlen, max_windows, batch_size, progress, desc=f"ppl {dataset}", flag=flag)
    return res if return_details else res.ppl
