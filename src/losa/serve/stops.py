"""Text of tokens as they are generated, and the criterion that ends generation at a stop string.

Decoding each new token alone, or a fixed window of the last few tokens, breaks on tokens that are not
whole characters: with byte-level BPE or SentencePiece byte fallback a CJK character is two to four
tokens, each decoding to U+FFFD until the last one arrives, so a window of "characters + 1" tokens never
holds a two-character CJK stop string. :class:`IncrementalDecoder` instead decodes the tokens since the
last emitted text (with and without the newest ones, so word-joining spaces come out right) and emits the
difference only once it no longer ends in an incomplete character, the scheme text-generation-inference
and vLLM use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria

from losa.serve.limits import Deadline

#: what decoders give for bytes that do not (yet) form a character
REPLACEMENT = "\ufffd"


def cut_at_stop(text: str, stops: Sequence[str] | None) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop string.

    Args:
        text: generated text.
        stops: stop strings (None or empty: none).

    Returns:
        ``text`` up to the earliest stop string, and whether one occurred.
    """
    hits = [i for i in (text.find(s) for s in stops or ()) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


class IncrementalDecoder:
    """The text of a growing token sequence, produced piece by piece without splitting a character.

    Args:
        tok: a Hugging Face tokenizer (``decode`` is all it needs).
    """

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # start of the decoding window: the tokens of the piece emitted last
        self._read = 0  # tokens up to here are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def add(self, ids: Sequence[int]) -> str:
        """Append tokens.

        Args:
            ids: the new token ids.

        Returns:
            The new text they complete ("" while a character is still incomplete).
        """
        self.ids.extend(ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back at the end of generation (an incomplete character shows as U+FFFD).

        Returns:
            The remaining text ("" if none).
        """
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if not after.startswith(before):  # only at the end: an incomplete character spoiled the window
            after = before + self._decode(self.ids[self._read:])  # (byte fallback replaces the whole run)
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        piece = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += piece
        return piece


class StopWatch(StoppingCriteria):
    """Follows the generated text and ends generation when it should, at the token that decides it.

    Ends on a stop string (at the token that completes it), on ``cancel`` (the client left) and at the
    deadline. Our own criterion rather than transformers' ``stop_strings``, which needs a tokenizer whose
    vocabulary it can map back to text (it fails on word-level vocabularies).

    Args:
        tok: the tokenizer.
        prompt_len: prompt tokens at the start of ``input_ids``.
        stops: stop strings (None: none).
        deadline: the request's deadline (None: none); passing it sets ``timed_out``.
        on_text: called with each new piece of text (streaming), from the generating thread.
        cancel: an event that ends generation when set (default: a new one, ``self.cancel``).
    """

    def __init__(self, tok: Any, prompt_len: int, stops: Sequence[str] | None = None,
                 deadline: Deadline | None = None, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> None:
        self.decoder = IncrementalDecoder(tok)
        self.prompt_len, self.stops, self.deadline, self.on_text = prompt_len, list(stops or ()), deadline, on_text
        self.longest = max((len(s) for s in self.stops), default=0)
        self.cancel = cancel if cancel is not None else threading.Event()
        self.stop_hit = self.timed_out = False

    def _take(self, piece: str) -> None:
        if not piece:
            return
        if self.on_text is not None:
            self.on_text(piece)
        if self.stops and not self.stop_hit:  # only where the new piece could complete a stop string
            tail = self.decoder.text[max(0, len(self.decoder.text) - len(piece) - self.longest + 1):]
            self.stop_hit = any(s in tail for s in self.stops)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        self._take(self.decoder.add(input_ids[0, self.prompt_len + len(self.decoder.ids):].tolist()))
        if self.deadline is not None and self.deadline.expired():
            self.timed_out = True
        done = self.stop_hit or self.timed_out or self.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def finish(self) -> str:
        """Flush the decoder after generation (see :meth:`IncrementalDecoder.flush`).

        Returns:
            The whole generated text.
        """
        self._take(self.decoder.flush())
        return self.decoder.text
