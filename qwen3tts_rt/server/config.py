"""Server settings: every limit is a named setting with a default. Parsed from the
command line in ``qwen3tts_rt.cli`` only; everything below takes a ``ServerConfig``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qwen3tts_rt.audio import ReferenceAudioRules
from qwen3tts_rt.engine.engine import EngineConfig


def default_voices_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "qwen3tts-rt" / "voices"


@dataclass(frozen=True)
class ServerConfig:
    model: str = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"  # checkpoint directory or hub id
    device: str = "cpu"  # the CLI resolves "auto" before it builds the config
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9090  # None: no /metrics endpoint; 0 picks a free port
    # OpenAI-compatible POST /v1/audio/speech over HTTP (server/openai_speech.py)
    openai_host: str = "127.0.0.1"
    openai_port: int | None = None  # None: off (default); 0 picks a free port
    voices_dir: Path = field(default_factory=default_voices_dir)
    # a shared Redis voice store instead of voices_dir: redis://[:password@]host:port/db,
    # rediss:// (TLS) or unix:///path.sock?db=N (server/voice_store_redis.py)
    voices_url: str | None = None
    redis_key_prefix: str = "qwen3tts:"  # every key of the store starts with it
    redis_timeout_s: float = 5.0  # connect and per-command socket timeout
    redis_max_connections: int = 32  # connection pool size per server process
    # limits
    # the engine's settings (live streams, packet sizes, queues, fast path): one source
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_synthesize_chars: int = 20_000  # text of a Synthesize / Riva request
    max_voices: int = 10_000  # voices in the store
    max_display_name_chars: int = 200
    max_instruct_chars: int = 2000  # a voice description (prefilled whole before the first frame)
    max_utterance_key_chars: int = 128  # BeginUtterance.key, Flush.client_id, Cancel.key
    stream_idle_timeout_s: float = 300.0  # a stream with nothing to speak that sends nothing ends
    max_stream_duration_s: float = 3600.0  # every stream ends (DEADLINE_EXCEEDED) after this long
    max_voice_jobs: int = 8  # voice clonings queued or running; more get RESOURCE_EXHAUSTED
    clone_workers: int = 2  # threads decoding and checking reference audio (the encoders run on the device)
    io_workers: int = 4  # threads for voice-store reads and writes
    max_concurrent_rpcs: int = 1024  # RPCs in flight (streams included); more get RESOURCE_EXHAUSTED
    # calls that need no token (health Check/Watch) in flight at once, and health Watch streams
    # among them: their own bound, so they cannot crowd out the rest (never more than half of
    # max_concurrent_rpcs: see unauthenticated_bounds); more get RESOURCE_EXHAUSTED
    max_unauthenticated_rpcs: int = 32
    max_health_watches: int = 8
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
    default_voice: str | None = None  # voice id or speaker for requests naming none (Riva)
    # operations
    auth_token: str | None = None  # bearer token; None: no auth
    metrics_auth_token: str | None = None  # bearer token for /metrics; None: /metrics is open
    tls_cert: Path | None = None
    tls_key: Path | None = None
    drain_grace_s: float = 30.0  # SIGTERM: in-flight streams get this long to finish
    warmup: bool = True
    torch_threads: int | None = None

    @property
    def max_sessions(self) -> int:
        return self.engine.max_sessions

    @property
    def max_utterance_chars(self) -> int:
        return self.engine.max_utterance_chars

    @property
    def max_receive_bytes(self) -> int:
        """gRPC receive limit: the largest reference audio plus room for the other fields
        (transcript, display name) and protobuf framing."""
        return self.ref_audio.max_bytes + 1024 * 1024 + 4 * self.max_utterance_chars

    @property
    def unauthenticated_bounds(self) -> tuple[int, int]:
        """(calls, watches): the bounds in force for calls that need no token, held to half
        of ``max_concurrent_rpcs`` so that the other half always stays for the rest."""
        calls = min(self.max_unauthenticated_rpcs, max(1, self.max_concurrent_rpcs // 2))
        return calls, min(self.max_health_watches, calls)

    def validated(self) -> ServerConfig:
        self.engine.validated()
        for name in (
            "max_synthesize_chars",
            "max_voices",
            "max_instruct_chars",
            "max_utterance_key_chars",
            "max_voice_jobs",
            "clone_workers",
            "io_workers",
            "max_concurrent_rpcs",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not (self.stream_idle_timeout_s > 0 and self.max_stream_duration_s > 0):
            raise ValueError("stream_idle_timeout_s and max_stream_duration_s must be > 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if not 0 < self.ref_audio_url_timeout_s <= 600:
            raise ValueError("ref_audio_url_timeout_s must be in (0, 600] seconds")
        if not 0 <= self.ref_audio_url_max_redirects <= 20:
            raise ValueError("ref_audio_url_max_redirects must be 0..20")
        if self.ref_audio_url_max_concurrent < 1:
            raise ValueError("ref_audio_url_max_concurrent must be >= 1")
        if self.voices_url is not None:
            from qwen3tts_rt.server.voice_store_redis import check_redis_settings

            check_redis_settings(
                self.voices_url, self.redis_key_prefix, self.redis_timeout_s, self.redis_max_connections
            )
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the auth token must not be empty")
        if self.metrics_auth_token is not None and not self.metrics_auth_token:
            raise ValueError("the metrics auth token must not be empty")
        if self.max_unauthenticated_rpcs < 1:
            raise ValueError("max_unauthenticated_rpcs must be >= 1")
        if not 0 <= self.max_health_watches <= self.max_unauthenticated_rpcs:
            raise ValueError(
                f"max_health_watches must be 0..max_unauthenticated_rpcs ({self.max_unauthenticated_rpcs}), "
                f"got {self.max_health_watches}"
            )
        rules = self.ref_audio
        for name in ("max_sample_rate", "max_channels", "max_decoded_bytes"):
            if getattr(rules, name) < 1:
                raise ValueError(f"ref_audio.{name} must be >= 1")
        if rules.max_sample_rate < rules.min_sample_rate:
            raise ValueError("ref_audio.max_sample_rate must be >= ref_audio.min_sample_rate")
        return self
