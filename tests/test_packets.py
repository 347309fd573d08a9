"""The packet policy (engine/packets.py) alone: a pure function of the held frames, the
listener's lead, the stream's pace and whether the talker waits for text. How the table
feeds it (clock, playback, pace) is tested in test_core.py; the decoder's exactness for
any packet sizes in test_codec.py and test_fast_path.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qwen3tts_rt.engine.packets import PacketPolicy, PacketSettingError

ADAPTIVE = PacketPolicy("adaptive", max_packet_frames=8, margin_s=0.25)
FRAME = ADAPTIVE.frame_s


def flush(
    p: PacketPolicy, held: int, lead: float, interval: float | None = 0.03, waits: bool = False
) -> bool:
    return p.flush(held, first=False, lead_s=lead, frame_interval_s=interval, text_waits=waits)


def test_the_policy_imports_no_torch() -> None:
    code = "import sys, qwen3tts_rt.engine.packets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("policy", ["adaptive", "fixed"])
@pytest.mark.parametrize("first", [1, 2, 4])
def test_the_first_packet_leaves_at_its_size_whatever_the_lead(policy: str, first: int) -> None:
    p = PacketPolicy(policy, first_packet_frames=first)
    for lead in (-1.0, 0.0, 10.0):
        got = [p.flush(n, first=True, lead_s=lead, frame_interval_s=0.2, text_waits=False) for n in range(6)]
        assert got == [n >= first for n in range(6)]


def test_fixed_packets_leave_at_their_size() -> None:
    p = PacketPolicy("fixed", packet_frames=3)
    assert [flush(p, n, lead=10.0, waits=True) for n in range(6)] == [False, False, False, True, True, True]


def test_adaptive_holds_while_the_listener_is_ahead_of_the_packet_being_grown() -> None:
    for held in range(1, 8):
        need = (held + 1) * FRAME + ADAPTIVE.margin_s  # the packet with the next frame, plus the margin
        assert not flush(ADAPTIVE, held, lead=need + 0.01)
        assert flush(ADAPTIVE, held, lead=need - 0.01)


def test_adaptive_holds_on_a_stream_slower_than_real_time_and_not_on_one_that_keeps_pace() -> None:
    assert not flush(ADAPTIVE, 2, lead=-0.5, interval=FRAME * 1.5)
    assert not flush(ADAPTIVE, 2, lead=0.1, interval=FRAME * 1.5)
    assert flush(ADAPTIVE, 2, lead=-0.5, interval=FRAME * 0.9)
    assert flush(ADAPTIVE, 2, lead=0.1, interval=None)  # pace unknown yet: no holding


@given(
    held=st.integers(1, 20),
    lead=st.floats(-5, 5),
    interval=st.none() | st.floats(0, 1),
    waits=st.booleans(),
    cap=st.integers(1, 10),
)
def test_adaptive_never_holds_past_its_bound_nor_while_the_text_is_late(
    held: int, lead: float, interval: float | None, waits: bool, cap: int
) -> None:
    p = PacketPolicy("adaptive", max_packet_frames=cap)
    if held >= cap or waits:
        assert flush(p, held, lead, interval, waits)
    assert not p.flush(0, first=False, lead_s=lead, frame_interval_s=interval, text_waits=waits)


@pytest.mark.parametrize(
    ("kw", "setting"),
    [
        ({"policy": "grow"}, "packet_policy"),
        ({"first_packet_frames": 0}, "first_packet_frames"),
        ({"packet_frames": 101}, "packet_frames"),
        ({"max_packet_frames": 0}, "max_packet_frames"),
        ({"margin_s": -1.0}, "packet_margin_s"),
    ],
)
def test_bad_settings_name_themselves(kw: dict[str, object], setting: str) -> None:
    with pytest.raises(PacketSettingError, match=setting) as e:
        PacketPolicy(**kw).validated()  # type: ignore[arg-type]
    assert e.value.setting == setting
