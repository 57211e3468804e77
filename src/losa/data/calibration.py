"""Calibration samples: n random windows of seqlen tokens, seeded (the SparseGPT/Wanda protocol)."""

from __future__ import annotations

import os
import random

import torch

from losa.data.sources import is_named, load_documents
from losa.errors import NO_TOKENIZER_FIX, LosaError, option
from losa.models.offload import input_device
from losa.models.registry import check_window

#: seed prompts for data-free ("self") calibration
SELF_PROMPTS = (
    "The", "In", "A", "It was", "Once upon a time", "The history of", "Scientists", "def main():",
    "According to", "The following", "Today", "Here is", "My", "When the", "One of the", "There are",
)


def _window_from_stream(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, what: str) -> torch.Tensor:
    if ids.numel() <= 1:  # nothing, or a BOS token alone
        raise LosaError(f"{what} holds no text (an empty file?); give a calibration source with text")
    if ids.numel() <= seqlen:
        raise LosaError(f"{what} has only {ids.numel()} tokens, too short for seqlen {seqlen}; "
                        f"use a shorter {option('seqlen')} or more text")
    rng = random.Random(seed)
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s:s + seqlen] for s in starts])


def _windows_from_documents(tokenizer, docs: list[str], nsamples: int, seqlen: int, seed: int,
                            what: str) -> torch.Tensor:
    """C4 protocol: pick a random document longer than seqlen, then a random window inside it."""
    rng = random.Random(seed)
    out = []
    cache: dict[int, torch.Tensor] = {}
    attempts = 0
    while len(out) < nsamples:
        attempts += 1
        if attempts > 200 * nsamples + 1000:
            raise LosaError(f"{what}: too few documents longer than {seqlen} tokens; use a shorter "
                            f"{option('seqlen')}")
        i = rng.randint(0, len(docs) - 1)
        if i not in cache:
            cache[i] = tokenizer(docs[i], return_tensors="pt").input_ids[0]
        ids = cache[i]
        if ids.numel() <= seqlen:
            continue
        j = rng.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[j:j + seqlen])
    return torch.stack(out)


@torch.no_grad()
def self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int = 0, batch_size: int = 8,
                   progress: bool = True) -> torch.Tensor:
    """Data-free calibration: text sampled from the model itself, reproducible for a given seed."""
    from tqdm.auto import tqdm

    rng = random.Random(seed)
    device = input_device(model)  # CPU for an offloaded model: its hooks move the ids
    out = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in tqdm(range(0, nsamples, batch_size), desc="generating calibration text", disable=not progress):
            b = min(batch_size, nsamples - start)
            prompt = rng.choice(SELF_PROMPTS)
            enc = tokenizer([prompt] * b, return_tensors="pt")
            ids = enc.input_ids.to(device)
            new = max(1, seqlen - ids.shape[1])
            gen = model.generate(ids, attention_mask=enc.attention_mask.to(device), do_sample=True, top_k=50,
                                 top_p=0.95, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out.append(gen[:, :seqlen].cpu())
    return torch.cat(out)[:, :seqlen]


def check_calib_ids(model, calib_ids: torch.Tensor | None, min_rows: int = 1) -> torch.Tensor | None:
    """Check calibration ids given by the user (``calib_ids=`` of :func:`losa.prune` and :func:`losa.run`)
    before any work, so that a wrong tensor fails with one line instead of deep inside the model.

    Args:
        model: the causal LM the ids are for (its input embedding gives the vocabulary size).
        calib_ids: ``[nsamples, seqlen]`` token ids, or None (the config's calibration source is used).
        min_rows: the fewest windows the caller needs (LoSA's RMI compares layers over at least 2).
    Returns:
        The ids as int64 (the same tensor when already int64), or None for None.
    Raises:
        LosaError: not a 2-D integer tensor, an empty one, fewer than ``min_rows`` windows, an id outside
            ``[0, vocab_size)``, or windows longer than the model's context.
    """
    if calib_ids is None:
        return None
    fix = "pass token ids such as tokenizer(texts, return_tensors='pt').input_ids"
    if not isinstance(calib_ids, torch.Tensor):
        raise LosaError(f"calib_ids must be a 2-D integer tensor [nsamples, seqlen], got {type(calib_ids).__name__}; "
                        f"{fix}")
    if (calib_ids.ndim != 2 or calib_ids.dtype.is_floating_point or calib_ids.dtype.is_complex
            or calib_ids.dtype == torch.bool):
        raise LosaError(f"calib_ids must be a 2-D integer tensor [nsamples, seqlen], got "
                        f"{str(calib_ids.dtype).removeprefix('torch.')} of shape {tuple(calib_ids.shape)}; {fix}")
    if calib_ids.numel() == 0:
        raise LosaError(f"calib_ids is empty (shape {tuple(calib_ids.shape)}); pass at least one window of tokens")
    if calib_ids.shape[0] < min_rows:
        raise LosaError(f"calib_ids has {calib_ids.shape[0]} window(s); this needs at least {min_rows}: pass more "
                        "rows")
    emb = model.get_input_embeddings()
    vocab = int(getattr(emb, "num_embeddings", None) or emb.weight.shape[0])
    lo, hi = int(calib_ids.min()), int(calib_ids.max())
    if lo < 0 or hi >= vocab:
        raise LosaError(f"calib_ids hold token id {lo if lo < 0 else hi}, outside the model's vocabulary [0, {vocab}); "
                        "tokenize the calibration text with the model's own tokenizer")
    check_window(model, calib_ids.shape[1], "calibration window", "calib_ids.shape[1]")
    return calib_ids.long()


def record_calib_ids(recipe: dict, calib_ids: torch.Tensor | None) -> dict:
    """``recipe`` (a config dump) as a report records it: with user ``calib_ids``, their count and length as
    ``nsamples`` / ``seqlen`` and ``calib`` set to ``"calib_ids"`` (to rerun it, give the same ids again).

    Args:
        recipe: the config as a mapping (changed in place).
        calib_ids: the ``[n, seqlen]`` ids the run used, or None (the recipe stays as it is).
    Returns:
        ``recipe``.
    """
    if calib_ids is not None:
        recipe.update(calib="calib_ids", nsamples=int(calib_ids.shape[0]), seqlen=int(calib_ids.shape[1]))
    return recipe


def get_calibration(tokenizer, source: str = "c4", nsamples: int = 128, seqlen: int = 2048, seed: int = 0,
                    data_dir: str | os.PathLike | None = None, model=None, progress: bool = True) -> torch.Tensor:
    """``[nsamples, seqlen]`` token ids from ``source``: wikitext2/c4/ptb (train split), a local file,
    or ``self`` (generated by ``model``)."""
    if nsamples < 1 or seqlen < 2:
        raise LosaError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    if tokenizer is None:
        raise LosaError(f"calibration needs a tokenizer, and {NO_TOKENIZER_FIX}")
    if source == "self":
        if model is None:
            raise LosaError("'self' calibration needs the model to generate text")
        return self_generated(model, tokenizer, nsamples, seqlen, seed, progress=progress)
    docs = load_documents(source, "train", data_dir) if is_named(source) else load_documents(source, data_dir=data_dir)
    if not docs:
        raise LosaError(f"calibration source {source} is empty")
    if source == "c4":
        return _windows_from_documents(tokenizer, docs, nsamples, seqlen, seed, what=source)
    sep = " " if source == "ptb" else "\n\n"
    ids = tokenizer(sep.join(docs), return_tensors="pt").input_ids[0]
    return _window_from_stream(ids, nsamples, seqlen, seed, what=source)
