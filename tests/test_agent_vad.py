"""Turn-taking: the four-state machine (pure, driven frame by frame on a manual clock), and
webrtcvad + the machine on real speech (espeak-ng)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.config import ConfigError, VadConfig
from agent.vad import SpeechDetector, SpeechEnded, SpeechStarted, State, StateChanged, To16kMono, TurnDetector
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
