"""The dual-track text scheduler: a small state machine, no tensors.

The talker consumes one entry of the *text track* per position::

    track = ref_text_ids + text_ids + [tts_eos] + [tts_pad, tts_pad, ...]

The overlay needs entries ``0..C-1``; the step that follows frame ``t`` needs entry
``C + t``. An entry is *known* once its text token has been emitted by the
incremental tokenizer, or once the text has ended (then eos/pad are known too). The
talker is never stepped on an unknown entry, so a stream whose text arrives in any
pieces, at any pace, feeds the talker exactly what the whole-text call feeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DualTrackScheduler:
    tts_eos_id: int
    tts_pad_id: int
    overlay_len: int  # C
    ref_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    ended: bool = False

    def push(self, ids: list[int]) -> None:
        if self.ended:
            raise RuntimeError("text pushed after end of text")
        self.text_ids.extend(ids)

    def end(self) -> None:
        self.ended = True

    @property
    def _known(self) -> int:
        return len(self.ref_ids) + len(self.text_ids)

    def entry(self, i: int) -> int | None:
        """Track entry ``i``, or None while it is still unknown."""
        n_ref = len(self.ref_ids)
        if i < n_ref:
            return self.ref_ids[i]
        if i < self._known:
            return self.text_ids[i - n_ref]
        if not self.ended:
            return None
        return self.tts_eos_id if i == self._known else self.tts_pad_id

    def overlay_ids(self) -> list[int] | None:
        """Entries 0..C-1 once all are known."""
        last = self.entry(self.overlay_len - 1)
        if last is None:
            return None
        return [e for e in (self.entry(i) for i in range(self.overlay_len)) if e is not None]

    def step_id(self, frame_index: int) -> int | None:
        """The entry added to the talker input after frame ``frame_index``."""
        return self.entry(self.overlay_len + frame_index)

    def text_tokens_consumed(self, positions: int) -> int:
        """How many text tokens (not reference tokens) the talker has consumed after
        ``positions`` track entries."""
        return max(0, min(positions - len(self.ref_ids), len(self.text_ids)))
