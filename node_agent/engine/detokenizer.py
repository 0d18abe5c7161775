"""Incremental detokenization with stop strings.

Decoding one token at a time is wrong for byte-level and SentencePiece tokenizers: a character
can span several tokens, and a token's text can depend on its neighbour (leading-space rules).
As in vLLM and Hugging Face's TextStreamer, each step decodes only a short window,
ids[prefix_offset:], and emits what it adds over ids[prefix_offset:read_offset]; the window
starts at the last point where the text was complete, so a step costs O(window), not O(output).
Text ending in U+FFFD (an incomplete UTF-8 sequence) is not emitted until the next token.

Stop strings: text that could be the start of a stop string is held back until the next tokens
show whether it is; once the text contains a stop string, everything from it on is dropped and
`stopped` is set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """What the detokenizer needs from a tokenizer."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of safe-to-emit text deltas.

    Special tokens are skipped. `prefix_ids` are tokens generated before a resume: the state
    after them is exactly the state an uninterrupted stream would have, so the deltas that follow
    continue the original stream (their text counts as already emitted and is in `text`).
    Empty stop strings are ignored (they would match everywhere).
    """

    def __init__(
        self, tokenizer: Decoder, stop: Sequence[str] = (), prefix_ids: Sequence[int] = ()
    ) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: the text before it is complete
        self._read_offset = 0  # ids before this have been turned into text
        self._held = ""  # decoded text withheld because it may start a stop string
        self._emitted: list[str] = []
        self._matched_stop: str | None = None
        for token_id in prefix_ids:
            self.push(token_id)

    @property
    def text(self) -> str:
        """All text emitted so far (prefix included)."""
        if len(self._emitted) > 1:
            self._emitted = ["".join(self._emitted)]
        return self._emitted[0] if self._emitted else ""

    @property
    def stopped(self) -> bool:
        """Whether the output reached a stop string; no more text will be emitted."""
        return self._matched_stop is not None

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, if any."""
        return self._matched_stop

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far, prefix included (a copy)."""
        return list(self._ids)

    def push(self, token_id: int) -> str:
        """Add one generated token and return the text that became safe to emit ("" if none).

        After a stop string matched, tokens are still recorded but no text is emitted.
        """
        self._ids.append(token_id)
        if self.stopped:
            return ""
        return self._release(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """Emit everything still held back: call when finishing for a reason other than a stop
        string (EOS, length). A trailing incomplete character comes out as U+FFFD, as in
        `decode(all ids)`."""
        if self.stopped:
            return ""
        return self._release(self._decode_new(final=True), final=True)

    def _decode_new(self, *, final: bool) -> str:
        """Text added by the ids after the read offset, once it is complete (or `final`)."""
        if self._read_offset == len(self._ids):
            return ""
        window = self._ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(window[: self._read_offset - self._prefix_offset])
        new_text = self._tokenizer.decode(window)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR)):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def _release(self, delta: str, *, final: bool) -> str:
        """Append `delta` to the held text and emit what cannot be (part of) a stop string."""
        pending = self._held + delta
        cut = self._first_stop(pending)
        if cut is not None:
            out, self._held = pending[:cut], ""
        else:
            keep = 0 if final else self._stop_prefix_len(pending)
            out, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        if out:
            self._emitted.append(out)
        return out

    def _first_stop(self, text: str) -> int | None:
        """Position of the earliest stop string in `text` (recording which one), or None."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            at = text.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        if best is None:
            return None
        self._matched_stop = best[1]
        return best[0]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
