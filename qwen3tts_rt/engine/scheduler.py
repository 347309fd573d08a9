"""The text schedulers of the two official layouts: small state machines, no tensors.

Both lay the same *text track* over the talker positions that follow the prefix::

    track = ref_text_ids + text_ids + [tts_eos] + [tts_pad, tts_pad, ...]

and differ in when the talker reads it (official ``generate``, ``non_streaming_mode``):

* ``DualTrackScheduler`` (``non_streaming_mode=False``): one entry per position. The
  overlay (codec_bos + reference frames, C positions) is summed with entries
  ``0..C-1``; the step that follows frame ``t`` reads entry ``C + t``. The talker is
  never stepped on an unknown entry, so text arriving in any pieces, at any pace, feeds
  the talker exactly what the whole-text call feeds it.
* ``WholeTextScheduler`` (``non_streaming_mode=True``): the whole track up to tts_eos
  (``ref_text_ids + text_ids + [tts_eos]``, each summed with codec_pad) is prefilled at
  once when the text has ended; the C overlay positions are summed with tts_pad, and
  so is every later step.

The generator asks a scheduler two things: ``prompt_ids()`` (what to prefill after the
text-independent prefix, once known) and ``step_id(t)`` (the text id of the step after
frame ``t``, once known).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True)
class PromptIds:
    """The text ids of the positions prefilled after the prefix.

    ``body``: text ids each summed with codec_pad (the whole-text layout's text; empty
    in dual-track). ``overlay``: C text ids summed with codec_bos + the reference frames.
    """

    body: list[int]
    overlay: list[int]

    def __len__(self) -> int:
        return len(self.body) + len(self.overlay)


@dataclass
class TextScheduler:
    """Text known so far and the rules common to both layouts."""

    tts_eos_id: int
    tts_pad_id: int
    overlay_len: int  # C
    ref_ids: list[int] = field(default_factory=list)
    text_ids: list[int] = field(default_factory=list)
    ended: bool = False

    non_streaming_mode: ClassVar[bool] = False  # the official name of the layout

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

    def prompt_ids(self) -> PromptIds | None:
        """What to prefill after the prefix, or None while it is not known yet."""
        raise NotImplementedError

    def step_id(self, frame_index: int) -> int | None:
        """The text id added to the talker input after frame ``frame_index``."""
        raise NotImplementedError

    def text_tokens_consumed(self, positions: int) -> int:
        """How many text tokens (not reference tokens) the talker has read after
        ``positions`` text-track positions (``UtteranceState.positions_consumed``)."""
        return max(0, min(positions - len(self.ref_ids), len(self.text_ids)))


@dataclass
class DualTrackScheduler(TextScheduler):
    """``non_streaming_mode=False``: one text-track entry per talker position."""

    def overlay_ids(self) -> list[int] | None:
        """Entries 0..C-1 once all are known."""
        last = self.entry(self.overlay_len - 1)
        if last is None:
            return None
        return [e for e in (self.entry(i) for i in range(self.overlay_len)) if e is not None]

    def prompt_ids(self) -> PromptIds | None:
        ids = self.overlay_ids()
        return None if ids is None else PromptIds(body=[], overlay=ids)

    def step_id(self, frame_index: int) -> int | None:
        return self.entry(self.overlay_len + frame_index)


@dataclass
class WholeTextScheduler(TextScheduler):
    """``non_streaming_mode=True``: the whole text is read at once when it has ended."""

    non_streaming_mode: ClassVar[bool] = True

    def prompt_ids(self) -> PromptIds | None:
        if not self.ended:
            return None
        return PromptIds(
            body=[*self.ref_ids, *self.text_ids, self.tts_eos_id],
            overlay=[self.tts_pad_id] * self.overlay_len,
        )

    def step_id(self, frame_index: int) -> int | None:
        # Frames exist only after the prefill, i.e. after the end of the text.
        return self.tts_pad_id if self.ended else None


def new_scheduler(
    *, non_streaming_mode: bool, tts_eos_id: int, tts_pad_id: int, overlay_len: int, ref_ids: list[int]
) -> TextScheduler:
    """The scheduler of the layout the official ``non_streaming_mode`` names."""
    cls: type[TextScheduler] = WholeTextScheduler if non_streaming_mode else DualTrackScheduler
    return cls(tts_eos_id=tts_eos_id, tts_pad_id=tts_pad_id, overlay_len=overlay_len, ref_ids=list(ref_ids))
