"""Server settings: every limit is a named setting with a default. Parsed from the
command line in ``qwen3tts_rt.cli`` only; everything below takes a ``ServerConfig``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qwen3tts_rt.audio import ReferenceAudioRules


def default_voices_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qwen3tts-rt" / "voices"


@dataclass(frozen=True)
class ServerConfig:
    model: str = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"  # checkpoint directory or hub id
    device: str = "cpu"
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0 picks a free port
    voices_dir: Path = field(default_factory=default_voices_dir)
    # limits
    max_sessions: int = 16  # live streams (engine sessions); more get RESOURCE_EXHAUSTED
    max_utterance_chars: int = 20_000  # text of one utterance (between flushes)
    max_synthesize_chars: int = 20_000  # text of a Synthesize / Riva request
    max_voices: int = 10_000  # voices in the store
    max_display_name_chars: int = 200
    max_instruct_chars: int = 2000  # a voice description (prefilled whole before the first frame)
    max_buffered_packets: int = 256  # unread packets per stream before its generation pauses
    max_pending_utterances: int = 32  # utterances a stream may queue with flushes
    max_voice_jobs: int = 8  # voice clonings queued or running; more get RESOURCE_EXHAUSTED
    max_concurrent_rpcs: int = 1024  # RPCs in flight (streams included); more get RESOURCE_EXHAUSTED
    voice_cache_bytes: int = 256 * 1024 * 1024  # clone prompts kept in memory
    ref_audio: ReferenceAudioRules = field(default_factory=ReferenceAudioRules)
    max_response_bytes: int = 64 * 1024 * 1024  # largest single response (Riva unary Synthesize)
    # reference audio from a URL (ref_audio_url): off unless allowed; held to ref_audio.max_bytes
    allow_ref_audio_urls: bool = False
    ref_audio_url_timeout_s: float = 10.0  # connect + redirects + whole body
    ref_audio_url_max_redirects: int = 3
    ref_audio_url_allow_private: bool = False  # loopback/private/link-local hosts (SSRF guard)
    ref_audio_url_max_concurrent: int = 4  # downloads at once; more get RESOURCE_EXHAUSTED
    # defaults a request may override
    first_packet_frames: int = 1
    packet_frames: int = 1
    default_voice: str | None = None  # voice id or speaker for requests naming none (Riva)
    # operations
    auth_token: str | None = None  # bearer token; None: no auth
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_grace_s: float = 30.0  # SIGTERM: in-flight streams get this long to finish
    warmup: bool = True
    torch_threads: int | None = None

    @property
    def max_receive_bytes(self) -> int:
        """gRPC receive limit: the largest reference audio plus room for the other fields
        (transcript, display name) and protobuf framing."""
        return self.ref_audio.max_bytes + 1024 * 1024 + 4 * self.max_utterance_chars

    def validated(self) -> ServerConfig:
        for name in (
            "max_sessions",
            "max_utterance_chars",
            "max_synthesize_chars",
            "max_voices",
            "max_instruct_chars",
            "max_buffered_packets",
            "max_pending_utterances",
            "max_voice_jobs",
            "max_concurrent_rpcs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if not 0 < self.ref_audio_url_timeout_s <= 600:
            raise ValueError("ref_audio_url_timeout_s must be in (0, 600] seconds")
        if not 0 <= self.ref_audio_url_max_redirects <= 20:
            raise ValueError("ref_audio_url_max_redirects must be 0..20")
        if self.ref_audio_url_max_concurrent < 1:
            raise ValueError("ref_audio_url_max_concurrent must be >= 1")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the auth token must not be empty")
        return self
