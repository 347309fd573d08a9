"""The dual-track scheduler is a pure state machine: test it without a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3tts_rt.engine.scheduler import DualTrackScheduler

EOS, PAD = 9001, 9002


def whole(ref: list[int], text: list[int], c: int, steps: int) -> list[int]:
    """The track as the official whole-text call lays it out."""
    track = ref + text + [EOS]
    track += [PAD] * (c + steps + 1 - len(track))
    return track[: c + steps]


def test_waits_for_unknown_text_then_eos_then_pad() -> None:
    s = DualTrackScheduler(EOS, PAD, overlay_len=1)
    assert s.overlay_ids() is None
    s.push([5])
    assert s.overlay_ids() == [5]
    assert s.step_id(0) is None  # the talker must not step before token 2 is known
    s.push([6, 7])
    assert [s.step_id(0), s.step_id(1)] == [6, 7]
    assert s.step_id(2) is None
    s.end()
    assert [s.step_id(2), s.step_id(3), s.step_id(10)] == [EOS, PAD, PAD]


def test_icl_overlay_needs_reference_plus_text_or_end() -> None:
    s = DualTrackScheduler(EOS, PAD, overlay_len=5, ref_ids=[1, 2])
    s.push([3])
    assert s.overlay_ids() is None
    s.push([4, 5, 6])
    assert s.overlay_ids() == [1, 2, 3, 4, 5]
    assert s.step_id(0) == 6
    short = DualTrackScheduler(EOS, PAD, overlay_len=5, ref_ids=[1, 2])
    short.push([3])
    short.end()
    assert short.overlay_ids() == [1, 2, 3, EOS, PAD]


def test_push_after_end_is_refused() -> None:
    s = DualTrackScheduler(EOS, PAD, overlay_len=1)
    s.end()
    with pytest.raises(RuntimeError):
        s.push([1])


@settings(max_examples=300, deadline=None)
@given(
    ref=st.lists(st.integers(0, 100), max_size=5),
    text=st.lists(st.integers(0, 100), min_size=1, max_size=30),
    c_extra=st.integers(0, 8),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_any_arrival_order_feeds_the_whole_text_track(ref, text, c_extra, cuts) -> None:
    c = len(ref) + 1 + c_extra if ref else 1
    steps = len(text) + 5
    s = DualTrackScheduler(EOS, PAD, overlay_len=c, ref_ids=list(ref))
    fed: list[int] = []
    bounds = sorted({min(x, len(text)) for x in cuts} | {len(text)})
    prev = 0
    pieces = []
    for b in bounds:
        pieces.append(text[prev:b])
        prev = b
    frame = 0
    for _i, piece in enumerate([*pieces, None]):
        if piece is None:
            s.end()
        else:
            s.push(piece)
        # consume everything that is known, exactly as the generator does
        if not fed:
            ov = s.overlay_ids()
            if ov is None:
                continue
            fed.extend(ov)
        while frame < steps and (e := s.step_id(frame)) is not None:
            fed.append(e)
            frame += 1
    assert fed == whole(list(ref), list(text), c, steps)
