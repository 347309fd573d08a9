"""The text schedulers of both layouts are pure state machines: test them without a model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3tts_rt.engine.scheduler import DualTrackScheduler, PromptIds, WholeTextScheduler, new_scheduler

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


def test_whole_text_waits_for_the_end_then_reads_everything_at_once() -> None:
    s = WholeTextScheduler(EOS, PAD, overlay_len=3, ref_ids=[1, 2])
    assert s.prompt_ids() is None and s.step_id(0) is None
    s.push([5, 6])
    s.push([7])
    assert s.prompt_ids() is None  # known text is not enough: the layout needs all of it
    assert s.text_tokens_consumed(0) == 0
    s.end()
    ids = s.prompt_ids()
    assert ids == PromptIds(body=[1, 2, 5, 6, 7, EOS], overlay=[PAD, PAD, PAD])
    assert len(ids) == 9
    assert [s.step_id(t) for t in range(4)] == [PAD] * 4
    assert s.text_tokens_consumed(len(ids)) == 3  # the whole text was read by the prefill
    with pytest.raises(RuntimeError):
        s.push([8])


def test_new_scheduler_picks_the_layout() -> None:
    kw = dict(tts_eos_id=EOS, tts_pad_id=PAD, overlay_len=1, ref_ids=[])
    dual = new_scheduler(non_streaming_mode=False, **kw)  # type: ignore[arg-type]
    whole = new_scheduler(non_streaming_mode=True, **kw)  # type: ignore[arg-type]
    assert isinstance(dual, DualTrackScheduler) and not dual.non_streaming_mode
    assert isinstance(whole, WholeTextScheduler) and whole.non_streaming_mode
    for s in (dual, whole):
        s.push([5])
        s.end()
    assert dual.prompt_ids() == PromptIds(body=[], overlay=[5])
    assert whole.prompt_ids() == PromptIds(body=[5, EOS], overlay=[PAD])


@settings(max_examples=200, deadline=None)
@given(
    ref=st.lists(st.integers(0, 100), max_size=5),
    text=st.lists(st.integers(0, 100), min_size=1, max_size=30),
    cuts=st.lists(st.integers(0, 30), max_size=6),
)
def test_whole_text_prompt_is_independent_of_arrival(ref, text, cuts) -> None:
    c = len(ref) + 1
    s = WholeTextScheduler(EOS, PAD, overlay_len=c, ref_ids=list(ref))
    prev = 0
    for b in sorted({min(x, len(text)) for x in cuts} | {len(text)}):
        s.push(text[prev:b])
        prev = b
        assert s.prompt_ids() is None
    s.end()
    assert s.prompt_ids() == PromptIds(body=[*ref, *text, EOS], overlay=[PAD] * c)
