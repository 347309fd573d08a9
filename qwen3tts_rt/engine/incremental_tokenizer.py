"""Stable incremental text tokenization: text deltas in, text ids out as soon as they are final.

The talker consumes one text token per 80 ms frame, so a session can start speaking as
soon as its first text token is known for certain. :class:`IncrementalTokenizer` runs the
steps of :class:`~qwen3tts_rt.model.text_tokenizer.TextTokenizer` (NFC, the pre-tokenizer
regex, BPE per piece) on the *pending tail* of the text only and emits the ids of every
piece that no later text can change. For every way of cutting a text into deltas, the
concatenated ids equal ``tokenizer.text_ids(full_text)`` (property-tested).

Lag rule (what is held back after a ``push``): every pre-tokenizer piece of the text
received so far is emitted except

1. the last piece (more letters, digits, marks or an apostrophe suffix may extend it);
2. every piece that overlaps the trailing whitespace run (``"a  "`` + ``"b"`` re-splits
   the spaces as ``" "``, ``" b"``; ``"\\n "`` + ``"\\n"`` merges into ``"\\n \\n"``);
3. anything from the last NFC segment on (the last starter character and the combining
   marks after it, which a later combining mark could still compose or reorder).

Rule 3 only matters when the last piece starts after that segment's first character,
e.g. ``"q\\u0308"``. So ``push("Hello world, this")`` emits the ids of ``"Hello"``,
``" world"`` and ``","``; ``" this"`` waits for the next delta or :meth:`end`.

Why pieces before these are final: the regex has no look-behind, a match depends only on
the characters from its start to one past its end (a whitespace run is looked at as a
whole: rule 2), and
NFC composition never changes the regex class (letter case, mark, digit, space) of the
character it composes into (checked over the whole Unicode table). BPE runs per piece.

Deltas are ``str``, so a code point is never split; a grapheme (``"e"`` + ``"\\u0301"``,
an emoji ZWJ sequence, a flag) can be, and NFC handles that.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from qwen3tts_rt.errors import InvalidInputError
from qwen3tts_rt.model.text_tokenizer import NfcStream, TextTokenizer, segment_char_ends


class IncrementalTokenizer:
    """Per-session incremental tokenizer over a shared :class:`TextTokenizer` (which holds
    no per-text state).

    ``official_slice=True`` (default) yields :meth:`TextTokenizer.text_ids` (the official
    ``ids[3:-5]`` of the assistant template: the text is tokenized after the template's
    ``"\\n"`` and the first id dropped); ``False`` yields :meth:`TextTokenizer.encode`.

    Cost of a ``push``: linear in the delta plus the pending (not yet emitted) tail.
    """

    def __init__(self, tokenizer: TextTokenizer, *, official_slice: bool = True) -> None:
        self._tok = tokenizer
        self._nfc = NfcStream()
        # Normalized text of closed NFC segments not emitted yet, and for each of its
        # characters the raw offset (in the full input text) just past what it covers.
        self._norm = "\n" if official_slice else ""
        self._norm_ends: list[int] = [0] if official_slice else []
        self._skip_first = official_slice
        self._closed_raw = 0  # raw characters that are in closed segments
        self._pushed = 0
        self._ids: list[int] = []
        self._char_ends: list[int] = []
        self._consumed = 0
        self._ended = False

    # ------------------------------------------------------------------ state

    @property
    def ids(self) -> Sequence[int]:
        """All ids emitted so far (a read-only view, not a copy)."""
        return self._ids

    @property
    def char_ends(self) -> Sequence[int]:
        """For each emitted id, how many characters of the input text the ids up to and
        including it cover (non-decreasing; the numbers of :meth:`TextTokenizer.char_offsets`).
        A read-only view, not a copy."""
        return self._char_ends

    @property
    def consumed_chars(self) -> int:
        """Characters of the input text covered by the ids emitted so far."""
        return self._consumed

    @property
    def pushed_chars(self) -> int:
        """Characters pushed so far."""
        return self._pushed

    @property
    def pending_chars(self) -> int:
        """Normalized characters received but not covered by emitted ids yet (the work a
        ``push`` redoes is proportional to this plus the delta)."""
        return len(self._norm) + len(self._nfc.open_segment)

    @property
    def ended(self) -> bool:
        return self._ended

    # ------------------------------------------------------------------ input

    def push(self, delta: str) -> list[int]:
        """Add a text delta; returns the ids that became final (possibly none)."""
        if self._ended:
            raise RuntimeError("push() after end()")
        if not delta:
            return []
        try:
            delta.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError("text delta holds a lone surrogate", field="text") from None
        self._pushed += len(delta)
        for raw, norm in self._nfc.push(delta):
            self._add_segment(raw, norm)
        return self._emit(final=False)

    def end(self) -> list[int]:
        """The text is complete: returns the remaining ids. Safe to call twice (returns [])."""
        if self._ended:
            return []
        for raw, norm in self._nfc.end():
            self._add_segment(raw, norm)
        self._ended = True
        return self._emit(final=True)

    # ------------------------------------------------------------------ internals

    def _add_segment(self, raw: str, norm: str) -> None:
        self._norm += norm
        self._norm_ends.extend(segment_char_ends(raw, norm, self._closed_raw))
        self._closed_raw += len(raw)

    def _emit(self, *, final: bool) -> list[int]:
        closed = len(self._norm)
        if final:
            text = self._norm
            cut = closed
        else:
            text = self._norm + unicodedata.normalize("NFC", self._nfc.open_segment)
        spans = self._tok.pretokenize(text)
        if not spans:
            return []
        if not final:
            cut = min(closed, spans[-1][0])  # rules 1 and 3
            ws = len(text)
            while ws > 0 and text[ws - 1].isspace():  # a superset of the regex's \s
                ws -= 1
            if ws < len(text):  # rule 2
                for s, e in reversed(spans):
                    if s <= ws < e:
                        cut = min(cut, s)
                        break
        out: list[int] = []
        done = 0
        for s, e in spans:
            if e > cut:
                break
            for t in self._tok.encode_piece(text[s:e]):
                if t.char_end > 0:
                    self._consumed = max(self._consumed, self._norm_ends[s + t.char_end - 1])
                if self._skip_first:
                    self._skip_first = False
                    continue
                out.append(t.id)
                self._char_ends.append(self._consumed)
            done = e
        if done:
            self._norm = self._norm[done:]
            del self._norm_ends[:done]
        self._ids.extend(out)
        return out
