"""From committed answer tokens, block by block, to the text a client sees.

Blocks are committed left to right and a committed token never changes, so the answer is
final up to the last committed block: text can be streamed as each block lands. The answer
ends at the first EOS / end-of-turn token (unless ``ignore_eos``) or at the first stop string.
Streaming holds back what could still change: a trailing incomplete UTF-8 character (decoded
as U+FFFD by byte-level BPE) and a tail that may be the start of a stop string.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

REPLACEMENT_CHAR = "\ufffd"


def make_decoder(tokenizer: Any, vocab_limit: int | None = None) -> Callable[[Sequence[int]], str]:
    """``decode(ids) -> str`` without special tokens. Ids past the tokenizer's vocabulary
    (a model's embedding is often padded beyond it) are dropped rather than failing."""
    limit = len(tokenizer) if vocab_limit is None else vocab_limit

    def decode(token_ids: Sequence[int]) -> str:
        known = [t for t in token_ids if 0 <= t < limit]
        return tokenizer.decode(known, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    return decode


class TextAssembler:
    """Accumulates one choice's answer and hands out the text to emit.

    ``add(block_tokens)`` returns the new text that is final; ``close()`` returns what was
    held back. ``finish_reason`` is "stop" (a stop token or string ended the answer) or
    "length" (max_tokens reached), set once finished.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop_ids: Iterable[int],
                 stop_strings: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop_ids = frozenset(stop_ids)
        self._stop_strings = [s for s in stop_strings if s]
        self._tokens: list[int] = []
        self._emitted = 0
        self._text = ""
        self.finish_reason: str | None = None
        self.completion_tokens = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The answer so far (everything decided, including held-back text)."""
        return self._text

    def add(self, block_tokens: Sequence[int]) -> str:
        if self.finished:
            return ""
        for token in block_tokens:
            self.completion_tokens += 1
            if token in self._stop_ids:
                self.finish_reason = "stop"
                break
            self._tokens.append(token)
        self._text = self._decode(self._tokens)
        cut = self._first_stop_string()
        if cut is not None:
            self._text, self.finish_reason = self._text[:cut], "stop"
        if self.finished:
            return self._take(len(self._text))
        return self._take(self._safe_end())

    def close(self) -> str:
        """The rest of the text; the answer ran to max_tokens unless it had stopped."""
        if self.finish_reason is None:
            self.finish_reason = "length"
        return self._take(len(self._text))

    def _take(self, end: int) -> str:
        end = max(end, self._emitted)
        delta, self._emitted = self._text[self._emitted:end], end
        return delta

    def _first_stop_string(self) -> int | None:
        hits = [self._text.find(stop) for stop in self._stop_strings]
        hits = [hit for hit in hits if hit >= 0]
        return min(hits) if hits else None

    def _safe_end(self) -> int:
        end = len(self._text)
        while end > self._emitted and self._text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        held = 0  # the longest tail that could still grow into a stop string
        for stop in self._stop_strings:
            for size in range(min(len(stop) - 1, end), held, -1):
                if self._text[end - size:end] == stop[:size]:
                    held = size
                    break
        return end - held
