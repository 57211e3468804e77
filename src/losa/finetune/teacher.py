"""The dense teacher's top-k next-token distributions, computed once and read from disk while training.

With ``FinetuneConfig.teacher_topk = k > 0`` distillation needs no second copy of the model: before
anything is pruned, :meth:`TeacherTopK.compute` runs the dense model over every fine-tuning example and
stores, for every token position, the k most likely next tokens and their log-probabilities. The
Trainer's collator then reads each example's rows by the index the example carries
(``"teacher_index"``), and the loss is :func:`losa.finetune.train.topk_distill_loss`.

Computation: the layer-sequential engine (:mod:`losa.calib.engine`) runs the examples one decoder layer
at a time (on CUDA a model that does not fit stays on the CPU and comes over a layer at a time), and
after the last layer the model's own head (final norm, LM head, logit soft-capping, ...) turns the
hidden states into logits (:meth:`losa.calib.engine.LayerwiseEngine.head_logits`), in eval mode and
without gradients. Examples are sorted by length and cut into groups of about ``group_tokens`` padded
tokens (one engine pass per group, so the activations held at once stay bounded); within a group they
are right-padded (with their own last token, not the pad token, which some models warn about without
an attention mask), which leaves the real positions' logits unchanged in a causal LM.

Layout of the cache directory (written to a temporary directory, then renamed):

- ``meta.json``: format, k, number of examples and tokens, a SHA-256 fingerprint of the examples' ids;
- ``offsets.npy``: int64 ``[n + 1]``, example i owns rows ``offsets[i]:offsets[i + 1]``;
- ``indices.npy``: int32 ``[tokens, k]``, the teacher's top-k token ids per position, most likely first;
- ``logprobs.npy``: float32 ``[tokens, k]``, their log-probabilities under the full-vocabulary softmax
  at temperature 1 (the training temperature is applied when the loss renormalises over the k ids:
  ``softmax(log p / T)`` over the support equals ``softmax(z / T)`` over it, since ``log p = z - log Z``).

Size: ``tokens × k × 8`` bytes (4 for the id, 4 for the log-probability) plus ``8 (n + 1)`` bytes of
offsets, e.g. 1024 examples of about 100 tokens at k = 64: about 52 MB.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from losa.calib.engine import LayerwiseEngine
from losa.calib.visitor import LayerContext, LayerVisitor
from losa.errors import LosaError, option
from losa.models.registry import get_decoder_layers
from losa.utils.io import atomic_directory

#: name of the cache directory inside a LoSA run directory
CACHE_DIR = "teacher_topk"
FORMAT = 1


def examples_fingerprint(examples: Sequence[dict[str, list[int]]]) -> str:
    """SHA-256 of the examples' ``input_ids`` (what the teacher's distributions depend on)."""
    return hashlib.sha256(json.dumps([list(e["input_ids"]) for e in examples]).encode()).hexdigest()


class _TopKVisitor(LayerVisitor):
    """At the last decoder layer: logits through the model's head, top-k of their log-softmax per position."""

    def __init__(self, last: int, k: int, sink: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        self.last, self.k, self.sink = last, k, sink

    def visit(self, ctx: LayerContext) -> None:
        if ctx.index != self.last:
            return
        for b, hidden in enumerate(ctx.outputs):
            logits = ctx.engine.head_logits(b, hidden)
            if self.k > logits.shape[-1]:
                raise LosaError(f"teacher_topk {self.k} exceeds the vocabulary of {logits.shape[-1]} tokens; "
                                f"set {option('teacher_topk')} to {logits.shape[-1]} or lower")
            logp = torch.log_softmax(logits.float(), dim=-1)
            del logits
            values, ids = logp.topk(self.k, dim=-1)  # sorted, most likely first
            del logp
            self.sink(b, values.cpu(), ids.cpu())


class TeacherTopK:
    """A teacher cache directory (see the module docstring), memory-mapped for reading.

    Args:
        path: the directory written by :meth:`compute`.
    Raises:
        LosaError: the directory is missing, incomplete or of another format.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            raise LosaError(f"teacher cache {self.path} missing or incomplete; rerun without {option('resume')} to "
                            "recompute it")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise LosaError(f"teacher cache {self.path} has format {meta.get('format')}, this losa reads {FORMAT}; "
                            "delete it and rerun")
        self.k: int = int(meta["k"])
        self.fingerprint: str = meta["fingerprint"]
        self.offsets = np.load(self.path / "offsets.npy")
        self.indices = np.load(self.path / "indices.npy", mmap_mode="r")
        self.logprobs = np.load(self.path / "logprobs.npy", mmap_mode="r")
        if self.indices.shape != (int(self.offsets[-1]), self.k) or self.logprobs.shape != self.indices.shape:
            raise LosaError(f"teacher cache {self.path} is inconsistent (arrays do not match meta.json); delete it "
                            "and rerun")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        """Bytes on disk of the arrays: ``tokens × k × 8 + 8 (n + 1)``."""
        return int(self.indices.nbytes + self.logprobs.nbytes + self.offsets.nbytes)

    def length(self, i: int) -> int:
        """Number of token positions cached for example ``i``."""
        return int(self.offsets[i + 1] - self.offsets[i])

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Example ``i``'s cached targets.

        Args:
            i: the example's index (its ``"teacher_index"``).
        Returns:
            ``(indices, logprobs)``: int64 ``[length, k]`` token ids and float32 ``[length, k]``
            log-probabilities (temperature 1, full-vocabulary normalisation), most likely first.
        Raises:
            LosaError: ``i`` out of range.
        """
        if not 0 <= i < len(self):
            raise LosaError(f"teacher cache {self.path} has {len(self)} examples, not index {i}; delete it and rerun")
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return (torch.from_numpy(np.array(self.indices[a:b], dtype=np.int64)),
                torch.from_numpy(np.array(self.logprobs[a:b], dtype=np.float32)))

    def close(self) -> None:
        """Drop the memory maps (before the directory is deleted)."""
        self.indices = self.logprobs = None  # type: ignore[assignment]

    @staticmethod
    def matches(path: str | os.PathLike, examples: Sequence[dict[str, list[int]]], k: int) -> bool:
        """Whether ``path`` holds a complete cache of top-``k`` for exactly these ``examples``."""
        meta_file = Path(path) / "meta.json"
        if not meta_file.is_file():
            return False
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError:
            return False
        return (meta.get("format") == FORMAT and meta.get("k") == k and meta.get("examples") == len(examples)
                and meta.get("fingerprint") == examples_fingerprint(examples))

    @classmethod
    def compute(cls, model: nn.Module, examples: Sequence[dict[str, list[int]]], path: str | os.PathLike, k: int,
                device: str | torch.device = "auto", batch_tokens: int = 1024, group_tokens: int = 16384,
                progress: bool = False) -> TeacherTopK:
        """Run the (dense) ``model`` over ``examples`` and store its top-``k`` next-token log-probabilities.

        Args:
            model: the dense teacher, a causal LM of a registered architecture (left unchanged).
            examples: ``{"input_ids": [...]}`` dicts; every position of every example is cached.
            path: the cache directory (replaced atomically if it exists).
            k: token ids kept per position (1 ≤ k ≤ vocabulary size).
            device: compute device of the layer-sequential engine.
            batch_tokens: about this many padded tokens per forward (the logits of one forward,
                ``[b, seq, vocab]`` float32, are the largest tensor).
            group_tokens: about this many padded tokens per engine pass (bounds the activations held).
            progress: progress bars.
        Returns:
            the cache, opened for reading.
        Raises:
            LosaError: no examples; ``k`` < 1 or larger than the vocabulary; an empty example.
        """
        if not examples:
            raise LosaError("no fine-tuning examples to compute the teacher cache for; add data")
        if k < 1:
            raise LosaError(f"teacher_topk must be ≥ 1 for a cache, got {k}; set {option('teacher_topk')} to e.g. "
                            "64 (0 = no cache)")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = getattr(head, "out_features", None)
        if vocab is not None and k > vocab:
            raise LosaError(f"teacher_topk {k} exceeds the vocabulary of {vocab} tokens; set "
                            f"{option('teacher_topk')} to {vocab} or lower")
        lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
        if lengths.min() < 1:
            raise LosaError("a fine-tuning example has no tokens; drop empty examples")
        offsets = np.zeros(len(examples) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        last = len(get_decoder_layers(model)) - 1
        path = Path(path)
        with atomic_directory(path, overwrite=True) as tmp:
            idx_arr = np.lib.format.open_memmap(tmp / "indices.npy", mode="w+", dtype=np.int32,
                                                shape=(int(offsets[-1]), k))
            lp_arr = np.lib.format.open_memmap(tmp / "logprobs.npy", mode="w+", dtype=np.float32,
                                               shape=(int(offsets[-1]), k))
            groups = _groups(lengths, group_tokens)
            for g, members in enumerate(groups):
                seq = int(lengths[members].max())
                ids = torch.empty((len(members), seq), dtype=torch.long)
                for r, j in enumerate(members):
                    row = torch.tensor(examples[j]["input_ids"], dtype=torch.long)
                    ids[r, :len(row)], ids[r, len(row):] = row, row[-1]  # right-padded with its last token
                bs = max(1, batch_tokens // seq)
                sink = _RowWriter(idx_arr, lp_arr, offsets, lengths, members, bs)
                desc = "teacher top-k" + (f" ({g + 1}/{len(groups)})" if len(groups) > 1 else "")
                LayerwiseEngine(model, ids, device=device, batch_size=bs, progress=progress,
                                desc=desc).run(_TopKVisitor(last, k, sink), layer_indices=[last])
                del sink
            idx_arr.flush()
            lp_arr.flush()
            del idx_arr, lp_arr
            np.save(tmp / "offsets.npy", offsets)
            (tmp / "meta.json").write_text(json.dumps({
                "format": FORMAT, "k": k, "examples": len(examples), "tokens": int(offsets[-1]),
                "fingerprint": examples_fingerprint(examples), "logprobs": "float32, temperature 1",
            }, indent=1))
        return cls(path)


class _RowWriter:
    """Writes one engine batch's top-k rows into the cache arrays at each member example's offset."""

    def __init__(self, idx_arr: np.ndarray, lp_arr: np.ndarray, offsets: np.ndarray, lengths: np.ndarray,
                 members: list[int], batch_size: int) -> None:
        self.idx_arr, self.lp_arr, self.offsets, self.lengths = idx_arr, lp_arr, offsets, lengths
        self.members, self.batch_size = members, batch_size

    def __call__(self, b: int, values: torch.Tensor, top: torch.Tensor) -> None:
        """Batch ``b``'s ``values`` / ``top`` (``[rows, seq, k]``): each row's first ``length`` positions."""
        for r in range(values.shape[0]):
            j = self.members[b * self.batch_size + r]
            a, n = int(self.offsets[j]), int(self.lengths[j])
            self.idx_arr[a:a + n] = top[r, :n].numpy().astype(np.int32)
            self.lp_arr[a:a + n] = values[r, :n].numpy()


def _groups(lengths: np.ndarray, group_tokens: int) -> list[list[int]]:
    """Example indices sorted by length (longest first), cut into groups of at most ``group_tokens``
    padded tokens (a group always holds at least one example)."""
    order = sorted(range(len(lengths)), key=lambda j: (-int(lengths[j]), j))
    groups: list[list[int]] = []
    cur: list[int] = []
    for j in order:
        seq = int(lengths[cur[0]]) if cur else int(lengths[j])  # the first member is the longest
        if cur and (len(cur) + 1) * seq > group_tokens:
            groups.append(cur)
            cur = []
        cur.append(j)
    if cur:
        groups.append(cur)
    return groups
