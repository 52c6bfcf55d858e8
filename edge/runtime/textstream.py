"""Turn a stream of token ids into a stream of text deltas: whole characters only, stops cut out.

Byte-level tokenizers split multi-byte UTF-8 characters across tokens (an emoji is often three or
four tokens); decoding a token alone yields U+FFFD. :class:`IncrementalDetokenizer` decodes a short
sliding window and only releases text once it no longer ends in an incomplete character, the way
vLLM and TGI do. :class:`StopMatcher` holds back text that could be the start of a stop string, so
a stop string is never streamed and then taken back.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Decode token ids one at a time into complete-character text deltas."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: a few tokens already emitted, for context
        self._read = 0  # tokens up to here have been emitted as text

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Add one token and return the new complete text (may be empty)."""
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith(REPLACEMENT)):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            return delta
        if final:
            self._prefix = self._read = len(self.ids)
        return ""


class StopMatcher:
    """Find stop strings in streamed text, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        if not self.stops:
            return text, False
        buf = self._pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._pending = ""
            return buf[: min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._pending = buf[len(buf) - hold:] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Return the held-back text (the stream ended without completing a stop string)."""
        out, self._pending = self._pending, ""
        return out
