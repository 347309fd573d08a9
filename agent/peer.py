"""One WebRTC call (aiortc): the microphone track into the VAD, the paced track out, the
data channel both ways, and the conversation that ties them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from agent import metrics
from agent.asr import ASRClient
from agent.audio_out import PacedAudioTrack
from agent.clock import Clock, SystemClock
from agent.config import AgentConfig
from agent.conversation import Conversation
from agent.errors import BadRequestError
from agent.llm import LLMClient
from agent.messages import Error, Interrupt, Outbound, Ping, Pong, Ready, UserText, parse_inbound
from agent.tts import TTSClient
from agent.vad import SpeechDetector, To16kMono

log = logging.getLogger(__name__)

OUTBOX_LIMIT = 256  # messages kept while the data channel is not open yet
CONNECT_TIMEOUT_S = 30.0  # an answered offer that never connects is closed after this
# aiortc's audio jitter buffer hands a packet on only once this many later packets have
# arrived (RTCRtpReceiver: JitterBuffer(prefetch=4)): a received frame's audio had arrived
# this many frames before the frame reaches us. tests/test_agent_receive_timing.py checks it.
RECEIVE_HOLD_FRAMES = 4


def rtc_configuration(config: AgentConfig) -> RTCConfiguration:
    # iceServers=[] (not None): aiortc's default is a public STUN server.
    return RTCConfiguration(
        iceServers=[RTCIceServer(list(s.urls), s.username, s.credential) for s in config.ice_servers]
    )


class PeerSession:
    def __init__(
        self,
        config: AgentConfig,
        *,
        tts: TTSClient,
        llm: LLMClient | None = None,
        asr: ASRClient | None = None,
        clock: Clock | None = None,
        on_closed: Callable[[PeerSession], None] | None = None,
    ) -> None:
        self.id = uuid.uuid4().hex[:12]
        self.config = config
        self.clock = clock or SystemClock()
        self.pc = RTCPeerConnection(rtc_configuration(config))
        self.track = PacedAudioTrack(self.clock)
        self.conversation = Conversation(
            config, tts=tts, llm=llm, asr=asr, track=self.track, send=self.send, clock=self.clock
        )
        self.detector = SpeechDetector(config.vad, self.clock)
        self._on_closed = on_closed
        self._channel: Any = None
        self._outbox: deque[str] = deque(maxlen=OUTBOX_LIMIT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self.connected = asyncio.Event()
        metrics.PEERS.inc()

    # ------------------------------------------------------------------ signalling

    async def accept(self, offer: RTCSessionDescription) -> RTCSessionDescription:
        """Answer ``offer`` (ICE candidates gathered: no trickle)."""
        pc = self.pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)
        await pc.setRemoteDescription(offer)
        pc.addTrack(self.track)  # takes the offer's audio transceiver
        await pc.setLocalDescription(await pc.createAnswer())
        self._spawn(self._close_if_never_connected(), "connect-timeout")
        return pc.localDescription

    async def _close_if_never_connected(self) -> None:
        try:
            await asyncio.wait_for(self.connected.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            log.info("peer %s: not connected after %.0f s: closing", self.id, CONNECT_TIMEOUT_S)
            await self.close()

    async def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("peer %s: %s", self.id, state)
        if state == "connected":
            self.connected.set()
        elif state in ("failed", "closed"):
            await self.close()

    # ------------------------------------------------------------------ media

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio":
            self._spawn(self._listen(track), "mic")

    async def _listen(self, track: MediaStreamTrack) -> None:
        """Microphone -> 16 kHz mono -> VAD -> turn events for the conversation. The VAD
        stamps speech at the audio's own time: the frame's pts (from its RTP timestamp), put
        on our clock at the moment its packet arrived (before aiortc's jitter buffer)."""
        to16k = To16kMono()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            assert isinstance(frame, av.AudioFrame)
            held = RECEIVE_HOLD_FRAMES * frame.samples / frame.sample_rate
            media_time = (
                None if frame.pts is None or frame.time_base is None else float(frame.pts * frame.time_base)
            )
            events = self.detector.push(to16k.convert(frame), media_time, self.clock.now() - held)
            if events:
                self.conversation.on_vad(events)

    # ------------------------------------------------------------------ data channel

    def _on_datachannel(self, channel: Any) -> None:
        self._channel = channel
        channel.on("message", self._on_message)
        channel.on("open", self._flush_outbox)
        c, conv = self.config, self.conversation
        vad = c.vad
        self.send(
            Ready(
                mode="say" if c.say_mode else "llm",
                asr=conv.asr is not None,
                voice=conv.tts.voice,
                vad={"frame_ms": vad.frame_ms, "start_ms": vad.start_ms, "stop_ms": vad.stop_ms},
            )
        )
        self._flush_outbox()

    def _on_message(self, raw: str | bytes) -> None:
        try:
            msg = parse_inbound(
                raw, max_bytes=self.config.max_message_bytes, max_text_chars=self.config.max_text_chars
            )
        except BadRequestError as e:
            self.send(Error(str(e)))
            return
        if isinstance(msg, UserText):
            self.conversation.on_user_text(msg.text)
        elif isinstance(msg, Interrupt):
            self.conversation.barge_in()
        elif isinstance(msg, Ping):
            self.send(Pong(msg.id))

    def send(self, msg: Outbound) -> None:
        """To the client over the data channel (kept until it opens; dropped once closed)."""
        if self._closed:
            return
        self._outbox.append(msg.to_json())
        self._flush_outbox()

    def _flush_outbox(self) -> None:
        ch = self._channel
        if ch is None or ch.readyState != "open":
            return
        while self._outbox:
            ch.send(self._outbox.popleft())

    # ------------------------------------------------------------------ lifetime

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=f"peer-{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Hang up: stop the conversation, the tracks and the connection. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t is not current:
                t.cancel()
        await self.conversation.close()
        self.track.stop()
        await self.pc.close()
        if self._on_closed is not None:
            self._on_closed(self)
        metrics.PEERS.dec()
        with contextlib.suppress(Exception):
            await asyncio.gather(*(t for t in self._tasks if t is not current), return_exceptions=True)
