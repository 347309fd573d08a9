"""Turn-taking: the four-state machine (pure, driven frame by frame on a manual clock),
webrtcvad + the machine on real speech (espeak-ng), and speech stamped at the audio's own
time however late or bunched up its frames are handed over."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest
import webrtcvad

from agent.config import ConfigError, VadConfig
from agent.vad import (
    VAD_RATE,
    AudioTimeline,
    SpeechDetector,
    SpeechEnded,
    SpeechStarted,
    State,
    StateChanged,
    To16kMono,
    TurnDetector,
)
from tests.agent_helpers import ESPEAK, ManualClock, espeak, silence

CFG = VadConfig(frame_ms=20, start_ms=60, stop_ms=100, max_turn_s=2.0)  # 3 frames to start, 5 to stop


def run(det: TurnDetector, clock: ManualClock, pattern: str) -> list[object]:
    """Feed ``pattern`` ('x' speech, '.' silence), one 20 ms frame per character."""
    events: list[object] = []
    for c in pattern:
        clock.advance(0.02)
        events.extend(det.push(c == "x"))
    return events


def states(events: list[object]) -> list[str]:
    return [e.state.value for e in events if isinstance(e, StateChanged)]


def test_turn_starts_after_start_hysteresis_and_ends_after_stop_hysteresis() -> None:
    clock = ManualClock(0.0)
    det = TurnDetector(CFG, clock)
    events = run(det, clock, "..xx")
    assert states(events) == ["starting"] and det.state is State.STARTING
    events = run(det, clock, "x")
    started = [e for e in events if isinstance(e, SpeechStarted)]
    assert len(started) == 1 and det.state is State.SPEAKING
    assert started[0].at == pytest.approx(0.10) and started[0].began_at == pytest.approx(0.06)
    events = run(det, clock, "xx....")
    assert states(events) == ["stopping"] and not any(isinstance(e, SpeechEnded) for e in events)
    events = run(det, clock, ".")
    ended = [e for e in events if isinstance(e, SpeechEnded)]
    assert states(events) == ["quiet"] and len(ended) == 1
    end = ended[0]
    assert end.last_speech_at == pytest.approx(0.14)  # the last 'x'
    assert end.at - end.last_speech_at == pytest.approx(0.10)  # exactly stop_ms later
    assert end.speech_s == pytest.approx(5 * 0.02) and not end.truncated


def test_false_start_and_short_pause_do_not_change_the_turn() -> None:
    clock = ManualClock(0.0)
    det = TurnDetector(CFG, clock)
    events = run(det, clock, "xx.xx.x.")  # never 3 voiced frames in a row: no turn
    assert states(events) == ["starting", "quiet"] * 3
    assert not any(isinstance(e, SpeechStarted) for e in events)
    events = run(det, clock, "xxx...xx....x")  # pauses shorter than stop_ms keep the floor
    assert states(events) == ["starting", "speaking", "stopping", "speaking", "stopping", "speaking"]
    assert sum(isinstance(e, SpeechStarted) for e in events) == 1
    assert not any(isinstance(e, SpeechEnded) for e in events)


def test_long_turn_is_cut_at_max_turn() -> None:
    clock = ManualClock(0.0)
    det = TurnDetector(CFG, clock)
    events = run(det, clock, "x" * 99)  # max_turn_s counts from the turn's first voiced frame
    assert not any(isinstance(e, SpeechEnded) for e in events)
    events = run(det, clock, "x")  # 100 frames = 2 s
    ended = [e for e in events if isinstance(e, SpeechEnded)]
    assert len(ended) == 1 and ended[0].truncated and ended[0].speech_s == pytest.approx(2.0)
    assert det.state is State.QUIET
    assert states(run(det, clock, "xxx")) == ["starting", "speaking"]  # still talking: a new turn


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="aggressiveness"):
        VadConfig(aggressiveness=4).validated()
    with pytest.raises(ConfigError, match="10, 20 or 30"):
        VadConfig(frame_ms=25).validated()
    with pytest.raises(ConfigError, match="stop_ms"):
        VadConfig(stop_ms=5).validated()


@pytest.mark.skipif(ESPEAK is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
@pytest.mark.parametrize("frame_ms", [20, 30])
def test_detector_finds_espeak_turns_and_keeps_their_audio(frame_ms: int) -> None:
    import av

    speech = espeak("Hello there. What is the weather like today?")
    audio = np.concatenate([silence(0.5), speech, silence(1.0)])  # 48 kHz, as from the network
    clock = ManualClock(0.0)
    det = SpeechDetector(VadConfig(frame_ms=frame_ms, start_ms=120, stop_ms=480, preroll_ms=300), clock)
    to16k = To16kMono()
    events = []
    for i in range(0, audio.size, 960):  # 20 ms network frames
        frame = av.AudioFrame.from_ndarray(audio[None, i : i + 960], format="s16", layout="mono")
        frame.sample_rate = 48000
        for ev in det.push(to16k.convert(frame)):
            events.append((round(i / 48000, 2), ev))
        clock.advance(0.02)
    starts = [(t, e) for t, e in events if isinstance(e, SpeechStarted)]
    ends = [(t, e) for t, e in events if isinstance(e, SpeechEnded)]
    assert len(starts) == 1 and len(ends) == 1, [(t, type(e).__name__) for t, e in events]
    speech_s = speech.size / 48000
    assert 0.5 < starts[0][0] < 0.5 + 0.4  # confirmed soon after the speech began
    assert 0.5 + speech_s < ends[0][0] < 0.5 + speech_s + 0.7  # after the stop hysteresis
    end = ends[0][1]
    assert end.speech_s > 0.6 * speech_s
    captured = len(end.audio) / 2 / 16000
    assert speech_s - 0.2 < captured < speech_s + 0.3 + 0.5 + 0.1  # pre-roll + speech + stop wait


# --------------------------------------------------------------------------- the audio's own time


def vowel(seconds: float, rate: int = 48000, f0: float = 120.0) -> np.ndarray:
    """[S] int16: a synthetic voiced sound (harmonics of ``f0`` shaped by three formant peaks,
    4 Hz tremolo) that webrtcvad calls speech; it ends abruptly at the last sample."""
    t = np.arange(round(seconds * rate)) / rate
    x = np.zeros_like(t)
    for h in range(1, int(3800 / f0) + 1):
        gain = 0.05 + sum(np.exp(-((((h * f0) - formant) / 150.0) ** 2)) for formant in (700, 1200, 2500))
        x += gain * np.sin(2 * np.pi * h * f0 * t + h)
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    return np.round(x / np.abs(x).max() * 8000).astype(np.int16)


def network_frames(audio: np.ndarray) -> list[av.AudioFrame]:
    """20 ms 48 kHz frames as aiortc hands them over: pts from the RTP timestamp (0 first)."""
    frames = []
    for i in range(0, audio.size - 959, 960):
        f = av.AudioFrame.from_ndarray(audio[None, i : i + 960], format="s16", layout="mono")
        f.sample_rate = 48000
        f.pts = i
        f.time_base = fractions.Fraction(1, 48000)
        frames.append(f)
    return frames


def detect(frames: list[av.AudioFrame], handed_at: list[float], config: VadConfig) -> list[object]:
    """The detector's events when frame i is handed over at ``handed_at[i]`` (manual clock)."""
    clock = ManualClock(handed_at[0])
    det = SpeechDetector(config, clock)
    to16k = To16kMono()
    events: list[object] = []
    for f, t in zip(frames, handed_at, strict=True):
        clock.t = t
        events.extend(det.push(to16k.convert(f), float(f.pts * f.time_base)))
    return events


def test_end_of_speech_is_stamped_at_the_audios_time_not_when_it_was_processed() -> None:
    """The same call, with its frames handed over live, or held back by a 1.5 s stall and then
    handed over in one burst (as aiortc's queue does after the process stalls): the speech is
    stamped at the same instants, the end of the last frame webrtcvad calls speech, placed on
    the clock by the least-delayed frames. Only the decisions (``at``) are late."""
    config = VadConfig(frame_ms=20, start_ms=100, stop_ms=300)
    audio = np.concatenate([silence(0.3), vowel(0.8), silence(1.0)])
    frames = network_frames(audio)
    live = [50.0 + (k + 1) * 0.02 for k in range(len(frames))]  # frame k has arrived at its end
    burst_at = live[95]  # frames 10..95 wait through a stall, then come all at once
    stalled = [burst_at if 10 <= k <= 95 else t for k, t in enumerate(live)]
    a, b = detect(frames, live, config), detect(frames, stalled, config)
    ends = [[e for e in ev if isinstance(e, SpeechEnded)] for ev in (a, b)]
    starts = [[e for e in ev if isinstance(e, SpeechStarted)] for ev in (a, b)]
    assert [len(e) for e in ends] == [1, 1] and [len(s) for s in starts] == [1, 1]
    (end_a,), (end_b,) = ends
    (start_a,), (start_b,) = starts
    assert end_b.at == burst_at and end_b.at > end_a.at  # the decision came late...
    # ...the stamps did not (but for the timeline's drift allowance: 1 ms per s of stall)
    assert end_b.last_speech_at == pytest.approx(end_a.last_speech_at, abs=0.002)
    assert start_b.began_at == pytest.approx(start_a.began_at, abs=0.002)
    # the stamp is the end of the last voiced webrtcvad frame, in the audio's own time
    to16k = To16kMono()
    pcm = b"".join(to16k.convert(f) for f in frames)
    vad = webrtcvad.Vad(config.aggressiveness)
    n = VAD_RATE * config.frame_ms // 1000
    voiced = [vad.is_speech(pcm[i * 2 * n : (i + 1) * 2 * n], VAD_RATE) for i in range(len(pcm) // (2 * n))]
    last = max(i for i, v in enumerate(voiced) if v)
    assert end_a.last_speech_at == pytest.approx(50.0 + (last + 1) * config.frame_ms / 1000, abs=0.002)
    assert 1.1 <= (last + 1) * config.frame_ms / 1000 <= 1.1 + 0.2  # the vowel ends at 1.1 s (+ hangover)
    # live: stop_ms later, plus up to one network frame (the resampler's delay makes a VAD
    # frame complete only with the next network frame)
    assert 0.3 <= end_a.at - end_a.last_speech_at <= 0.3 + 0.02


def test_lost_packets_and_a_new_stream_keep_the_audio_timeline() -> None:
    """Media time comes from the frames' pts: a lost packet (pts skips 20 ms) moves the
    count on; the timeline maps media time to the clock by the least-delayed arrival, lets
    that offset rise slowly (clock drift) and starts over when media time goes backwards."""
    clock = ManualClock(10.0)
    det = SpeechDetector(VadConfig(frame_ms=20), clock)
    frame = bytes(640)  # 20 ms at 16 kHz
    det.push(frame, 0.0, received_at=10.02)
    det.push(frame, 0.02, received_at=10.05)  # 10 ms late
    assert det.timeline.offset == pytest.approx(10.0, abs=1e-4)
    det.push(frame, 0.06, received_at=10.08)  # the packet of 0.04 was lost
    assert det.timeline.at(0.08) == pytest.approx(10.08, abs=1e-4)
    det.push(frame, 0.0, received_at=20.02)  # a new stream: pts from 0 again
    assert det.timeline.at(0.02) == pytest.approx(20.02, abs=1e-4)
    tl = AudioTimeline(drift=0.001)
    tl.observe(1.0, 5.0)
    tl.observe(101.0, 105.5)  # every later frame 0.5 s late: the offset rises 1 ms per s
    assert tl.offset == pytest.approx(4.0 + 0.001 * 100.5)
    with pytest.raises(ValueError, match="drift"):
        AudioTimeline(drift=-1.0)
    with pytest.raises(ValueError, match="even"):
        det.push(b"\x00")


def test_turn_detector_takes_the_audio_time_when_given() -> None:
    clock = ManualClock(7.0)  # never moves: every frame is handed over at once
    det = TurnDetector(CFG, clock)
    events: list[object] = []
    for k, c in enumerate("xxxx" + "." * 5):
        events.extend(det.push(c == "x", audio_at=1.0 + 0.02 * (k + 1)))
    (start,) = [e for e in events if isinstance(e, SpeechStarted)]
    (end,) = [e for e in events if isinstance(e, SpeechEnded)]
    assert start.began_at == pytest.approx(1.02) and start.at == 7.0
    assert end.last_speech_at == pytest.approx(1.08) and end.at == 7.0
