"""The receive side as the agent's end-of-speech stamp assumes it: aiortc hands a received
audio frame on only once ``RECEIVE_HOLD_FRAMES`` later packets have arrived, so the frame's
audio had arrived that many frames earlier (``PeerSession._listen`` stamps it so). Two
aiortc peers in this process, over 127.0.0.1; the sender's microphone makes
frames only when the test allows, so the check is on counts, not on time."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Awaitable, Callable

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent.app import pin_ice_host_addresses
from agent.peer import RECEIVE_HOLD_FRAMES

pytestmark = pytest.mark.timeout(60)


class GatedMic(MediaStreamTrack):
    """20 ms frames of a 440 Hz tone, pts k * 960, made only up to ``allowed``."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        self.made = 0
        self.allowed = 0
        self._more = asyncio.Event()

    def allow(self, n: int) -> None:
        self.allowed = n
        self._more.set()

    async def recv(self) -> av.AudioFrame:
        while self.made >= self.allowed:
            self._more.clear()
            await self._more.wait()
        t = (self.made * 960 + np.arange(960)) / 48000
        tone = np.round(3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(tone[None, :], format="s16", layout="mono")
        frame.sample_rate = 48000
        frame.pts = self.made * 960
        frame.time_base = fractions.Fraction(1, 48000)
        self.made += 1
        return frame


async def wait_until(pred: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_received_frame_is_handed_on_once_hold_frames_later_packets_arrived() -> None:
    pin_ice_host_addresses(("127.0.0.1",))  # as the other agent tests do (process-wide)
    mic = GatedMic()
    sender = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    receiver = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    got: list[tuple[int, int]] = []  # (frame index from its pts, frames the mic had made by then)
    tasks: list[asyncio.Task[None]] = []

    async def listen(track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert frame.pts is not None
            got.append((frame.pts // 960, mic.made))

    receiver.on("track", lambda track: tasks.append(asyncio.create_task(listen(track))))
    try:
        sender.addTrack(mic)
        await sender.setLocalDescription(await sender.createOffer())
        await receiver.setRemoteDescription(sender.localDescription)
        await receiver.setLocalDescription(await receiver.createAnswer())
        await sender.setRemoteDescription(receiver.localDescription)

        async def packets_received() -> int:
            stats = await receiver.getReceivers()[0].getStats()
            return sum(s.packetsReceived for s in stats.values() if s.type == "inbound-rtp")

        async def received(n: int) -> bool:
            return await packets_received() >= n

        # HOLD packets arrived: all of them are held (a frame handed on early would show up
        # here; the wait only gives it the chance, a pass does not depend on it)
        mic.allow(RECEIVE_HOLD_FRAMES)
        await wait_until(lambda: received(RECEIVE_HOLD_FRAMES))
        await asyncio.sleep(0.2)
        assert got == []
        # one more packet: the first frame is handed on, with nothing later made
        mic.allow(RECEIVE_HOLD_FRAMES + 1)

        async def first() -> bool:
            return bool(got)

        await wait_until(first)
        assert got[0] == (0, RECEIVE_HOLD_FRAMES + 1)
        # a stream: no frame is ever handed on before HOLD later frames were made
        mic.allow(40)

        async def most() -> bool:
            return len(got) >= 30

        await wait_until(most)
        assert [k for k, _ in got] == list(range(len(got)))
        assert all(made >= k + 1 + RECEIVE_HOLD_FRAMES for k, made in got)
    finally:
        for t in tasks:
            t.cancel()
        await sender.close()
        await receiver.close()
