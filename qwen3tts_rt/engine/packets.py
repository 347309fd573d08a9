"""When generated frames leave as a packet: the packet policy, pure (no torch, no clock).

The codec decoder streams exactly for any packet sizes, and one call on t frames costs far
less than t calls on one frame (issue 17: 214 ms/frame at t=1, 60 ms/frame at t=8 on the
full-size decoder, CPU). So frames may be held back and decoded together, but only when
nobody hears the difference:

* the first packet of an utterance leaves at ``first_packet_frames`` (default 1: first
  audio as early as possible);
* ``fixed``: every later packet has ``packet_frames`` frames (the last one fewer);
* ``adaptive``: a frame is held back while either

  - the listener is ahead: the audio already sent outlasts playback by more than the
    packet being grown (the held frames plus the next one) plus ``margin_s``; or
  - the stream is slower than real time (the median gap between its recent frames is
    longer than a frame lasts): its listener will wait whatever we do, and bigger packets
    cut the decoder cost that makes it slow (the median: one long tick of a stream that
    keeps pace does not count);

  and never while the text is what limits progress (the talker waits for the next text
  token: a slow LLM gets small packets), never beyond ``max_packet_frames``.

The caller (``engine/core.py``) keeps the clock: it passes the listener's lead (sent audio
minus played audio, in seconds, on a playback that starts at the session's first packet
and never skips) and the stream's recent frame interval.
"""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("adaptive", "fixed")
MAX_PACKET_FRAMES = 100  # an upper bound on every packet size setting (8 s of audio)


class PacketSettingError(ValueError):
    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class PacketPolicy:
    policy: str = "adaptive"  # 'adaptive' or 'fixed'
    first_packet_frames: int = 1  # frames in the first packet of an utterance
    packet_frames: int = 1  # fixed: frames in each later packet
    max_packet_frames: int = 8  # adaptive: the most frames held back for one packet
    margin_s: float = 0.25  # adaptive: lead kept beyond the packet being grown
    frame_s: float = 0.08  # seconds of audio per frame (12.5 Hz codec)

    def validated(self) -> PacketPolicy:
        """Raises PacketSettingError (a ValueError) naming the setting."""
        if self.policy not in POLICIES:
            raise PacketSettingError(
                "packet_policy", f"packet_policy must be one of {', '.join(POLICIES)}, got {self.policy!r}"
            )
        for name in ("first_packet_frames", "packet_frames", "max_packet_frames"):
            v = getattr(self, name)
            if not 1 <= v <= MAX_PACKET_FRAMES:
                raise PacketSettingError(name, f"{v} is out of range: 1 <= {name} <= {MAX_PACKET_FRAMES}")
        if not 0 <= self.margin_s <= 60:
            raise PacketSettingError(
                "packet_margin_s", f"packet_margin_s must be within 0..60 s, got {self.margin_s}"
            )
        if not self.frame_s > 0:
            raise PacketSettingError("frame_s", "frame_s must be positive")
        return self

    def flush(
        self,
        held: int,
        *,
        first: bool,
        lead_s: float,
        frame_interval_s: float | None,
        text_waits: bool,
    ) -> bool:
        """Whether the ``held`` frames leave now (False: hold them for at least one more).

        ``first``: no packet of this utterance has left yet. ``lead_s``: seconds of sent
        audio the listener has not played yet (negative: it has waited that long).
        ``frame_interval_s``: the median of the stream's recent gaps between two generated
        frames, in seconds (None: not known yet). ``text_waits``: the next frame needs text not received."""
        if held <= 0:
            return False
        if first:
            return held >= self.first_packet_frames
        if self.policy == "fixed":
            return held >= self.packet_frames
        if held >= self.max_packet_frames or text_waits:
            return True
        if lead_s > (held + 1) * self.frame_s + self.margin_s:
            return False  # the listener is ahead by more than the packet being grown
        # slower than real time: the listener waits anyway, bigger packets are cheaper
        slow = frame_interval_s is not None and frame_interval_s > self.frame_s
        return not slow
