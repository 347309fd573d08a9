"""The outbound track on a manual clock: 20 ms frames at 48 kHz paced by their timestamps,
silence when empty, 24 -> 48 kHz with PyAV, per-reply accounting, and a barge-in clear that
silences the very next frame."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.audio_out import FRAME_SAMPLES, OUT_RATE, PacedAudioTrack, Upsampler
from tests.agent_helpers import ManualClock


def chirp(seconds: float, rate: int) -> np.ndarray:
    """200 Hz -> 4 kHz sweep (no period: a cross-correlation has one peak)."""
    t = np.arange(round(seconds * rate)) / rate
    f0, f1 = 200.0, 4000.0
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return np.round(8000 * np.sin(phase)).astype(np.int16)


def test_upsampler_doubles_the_rate_without_seams() -> None:
    x = chirp(0.5, 24000)
    whole = Upsampler()
    ref = np.concatenate([whole.push(x.tobytes()), whole.flush()])
    assert ref.size == 2 * x.size
    chunked = Upsampler()
    parts = [chunked.push(x[i : i + 1920].tobytes()) for i in range(0, x.size, 1920)]
    got = np.concatenate([*parts, chunked.flush()])
    np.testing.assert_array_equal(got, ref)  # packet boundaries change nothing
    # it is the same tone: compare with the ideal 48 kHz signal away from the edges
    want = chirp(0.5, 48000)
    delay = int(np.argmax(np.correlate(got[:4800].astype(float), want[:2400].astype(float), "valid")))
    assert delay < 64  # the resampler's own delay (a few samples)
    err = got[delay + 1000 : 20000].astype(float) - want[1000 : 20000 - delay].astype(float)
    assert np.sqrt(np.mean(err**2)) < 0.02 * 8000


async def test_frames_are_paced_by_timestamps_and_silent_when_empty() -> None:
    clock = ManualClock(100.0)
    track = PacedAudioTrack(clock)
    frames = [await track.recv() for _ in range(5)]
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(5)]
    assert all(f.samples == FRAME_SAMPLES and f.sample_rate == OUT_RATE for f in frames)
    assert all(f.format.name == "s16" and f.layout.name == "mono" for f in frames)
    assert not any(f.to_ndarray().any() for f in frames)  # nothing queued: silence
    assert clock.sleeps == pytest.approx([100.0 + 0.02 * i for i in range(5)])
    # a late consumer catches up without drift: the schedule stays start + k * 20 ms
    clock.advance(0.05)
    await track.recv()
    assert clock.sleeps[-1] == pytest.approx(100.10)


async def test_audio_is_sent_in_order_with_per_reply_accounting() -> None:
    clock = ManualClock()
    first: list[tuple[int, float]] = []
    track = PacedAudioTrack(clock, on_first_audio=lambda turn, t: first.append((turn, t)))
    a = np.arange(1, 1501, dtype=np.int16)  # 1.5 frames
    b = np.full(600, 7, np.int16)
    await track.recv()  # one silent frame first
    track.push(1, a)
    track.push(2, b)
    track.end(1)
    track.end(2)
    out = np.concatenate([(await track.recv()).to_ndarray().reshape(-1) for _ in range(3)])
    np.testing.assert_array_equal(out[:1500], a)
    np.testing.assert_array_equal(out[1500:2100], b)
    assert not out[2100:].any()
    assert [t for t, _ in first] == [1, 2]
    assert first[0][1] == pytest.approx(clock.sleeps[1]) and first[1][1] == pytest.approx(clock.sleeps[2])
    assert track.sent_samples(1) == 1500 and track.sent_samples(2) == 600
    assert track.playback(1).drained.is_set() and track.playback(2).drained.is_set()
    await track.recv()
    assert [f.audible for f in track.frames] == [False, True, True, True, False]


async def test_drained_fires_only_after_end_and_all_sent() -> None:
    track = PacedAudioTrack(ManualClock())
    track.push(1, np.ones(960, np.int16))
    await track.recv()
    assert not track.playback(1).drained.is_set()  # more may come
    track.end(1)
    assert track.playback(1).drained.is_set()


class GatedClock(ManualClock):
    """Sleeps wait until the test releases them (then the clock jumps to the wake-up time)."""

    def __init__(self, t: float) -> None:
        super().__init__(t)
        self._gate = asyncio.Event()

    async def sleep_until(self, t: float) -> None:
        self.sleeps.append(t)
        await self._gate.wait()
        self._gate.clear()
        self.t = max(self.t, t)

    async def release(self) -> None:
        for _ in range(3):
            await asyncio.sleep(0)
        self._gate.set()


async def test_clear_silences_the_next_frame_and_reports_the_stop() -> None:
    clock = GatedClock(0.0)
    stops: list[tuple[float, float]] = []
    track = PacedAudioTrack(clock, on_stopped=lambda d, s: stops.append((d, s)))
    track.push(1, np.full(48000, 1000, np.int16))  # 1 s queued
    for _ in range(3):
        recv = asyncio.ensure_future(track.recv())
        await clock.release()
        assert (await recv).to_ndarray().any()
    # the decision comes 7 ms after the last frame, while the track waits for the next one
    recv = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0)
    clock.advance(0.007)
    decided = clock.now()
    dropped = track.clear(decided)
    await clock.release()
    frame = await recv
    assert dropped == 48000 - 3 * FRAME_SAMPLES
    assert not frame.to_ndarray().any()  # the very next frame is silent
    assert len(stops) == 1 and stops[0][0] == decided
    assert stops[0][1] - stops[0][0] == pytest.approx(0.013)  # at the next frame's time
    assert track.playback(1).drained.is_set() and track.sent_samples(1) == 3 * FRAME_SAMPLES
    assert not track.audible
    # clearing silence reports nothing
    track.clear()
    recv = asyncio.ensure_future(track.recv())
    await clock.release()
    await recv
    assert len(stops) == 1


async def test_stopped_track_ends_the_stream() -> None:
    from aiortc.mediastreams import MediaStreamError

    track = PacedAudioTrack(ManualClock())
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_clear_during_an_underrun_still_reports_the_stop() -> None:
    """A reply whose next audio is late (the TTS fell behind) is still being heard: a
    barge-in then is measured to the next frame, which is silent."""
    clock = ManualClock(0.0)
    stops: list[tuple[float, float]] = []
    track = PacedAudioTrack(clock, on_stopped=lambda d, s: stops.append((d, s)))
    track.push(1, np.full(FRAME_SAMPLES, 1000, np.int16))
    await track.recv()
    await track.recv()  # underrun: silence, but reply 1 has not ended
    assert track.audible
    clock.advance(0.005)
    track.clear()
    assert not track.audible
    await track.recv()
    assert stops == [(pytest.approx(0.025), pytest.approx(0.04))]
    track.push(1, np.ones(10, np.int16))  # ended: late audio of the reply is ignored
    assert track.queued_samples == 0


async def test_a_stall_skips_rtp_time_instead_of_delaying_it() -> None:
    """After the process stalls (the loop does not run for a second), the frames' RTP time
    stays on the wall clock: the next frame's pts jumps by the stall and the schedule keeps
    its start, so the receiver's jitter buffer does not grow by the stall. The queued audio
    is not lost: it goes on from where it stopped."""
    clock = ManualClock(100.0)
    track = PacedAudioTrack(clock)
    voice = np.arange(1, 10 * FRAME_SAMPLES + 1, dtype=np.int16)
    track.push(1, voice)
    sent = [await track.recv() for _ in range(3)]  # on time: pts 0, 960, 1920
    clock.advance(1.005)  # a stall: frame 3 (due at 100.06) is asked for at 101.045
    sent += [await track.recv() for _ in range(3)]
    wall_frames = 52  # whole 20 ms frames in the 1.045 s since the start
    assert [f.pts // FRAME_SAMPLES for f in sent] == [0, 1, 2, wall_frames, wall_frames + 1, wall_frames + 2]
    assert track.skipped_samples == (wall_frames - 3) * FRAME_SAMPLES
    # each later frame is released when its RTP time is due on the wall clock: RTP time and
    # wall time differ by the same constant as before the stall
    assert clock.sleeps[-2:] == pytest.approx([100.0 + (wall_frames + k) * 0.02 for k in (1, 2)])
    # skipped time, not skipped audio: the reply's samples go out in order, none dropped
    got = np.concatenate([f.to_ndarray().reshape(-1) for f in sent])
    np.testing.assert_array_equal(got, voice[: 6 * FRAME_SAMPLES])
    # a short delay (under MAX_LAG_S) is caught up by sending frames early, without a jump
    clock.advance(0.1)
    late = [await track.recv() for _ in range(2)]
    assert [f.pts // FRAME_SAMPLES for f in late] == [wall_frames + 3, wall_frames + 4]
