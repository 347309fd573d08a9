"""Agent settings: one frozen config object per component, parsed from the command line
only in ``agent.__main__``. Every limit is a named setting with a default."""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A setting is out of range or two settings contradict each other."""


@dataclass(frozen=True)
class VadConfig:
    """Voice-activity detection on 16 kHz mono audio (webrtcvad) and turn-taking hysteresis."""

    aggressiveness: int = 2  # webrtcvad mode 0 (least) .. 3 (most aggressive about non-speech)
    frame_ms: int = 20  # 10, 20 or 30 (webrtcvad frame sizes)
    start_ms: int = 200  # speech needed to confirm the user started talking (start hysteresis)
    stop_ms: int = 600  # silence needed to end the user's turn (stop hysteresis)
    preroll_ms: int = 300  # audio kept from before the start decision, for ASR
    max_turn_s: float = 30.0  # a longer turn is ended (and transcribed) at this length

    def validated(self) -> VadConfig:
        if self.aggressiveness not in (0, 1, 2, 3):
            raise ConfigError(f"VAD aggressiveness must be 0..3, not {self.aggressiveness}")
        if self.frame_ms not in (10, 20, 30):
            raise ConfigError(f"VAD frame must be 10, 20 or 30 ms, not {self.frame_ms}")
        for name in ("start_ms", "stop_ms"):
            v = getattr(self, name)
            if v < self.frame_ms or v > 10_000:
                raise ConfigError(f"VAD {name} must be between one frame ({self.frame_ms}) and 10000 ms")
        if not 0 <= self.preroll_ms <= 2000:
            raise ConfigError("VAD preroll_ms must be 0..2000")
        if not 1.0 <= self.max_turn_s <= 300.0:
            raise ConfigError("VAD max_turn_s must be 1..300")
        return self


@dataclass(frozen=True)
class TTSConfig:
    """The qwen3tts-rt server and the voice every reply uses."""

    address: str = "127.0.0.1:50051"
    voice_id: str | None = None  # a voice made by CreateVoice ...
    speaker: str | None = None  # ... or a built-in speaker (CustomVoice checkpoints)
    instruct: str = ""  # voice description (VoiceDesign) / style
    language: str = "auto"
    auth_token: str | None = None
    tls: bool = False
    tls_ca: str | None = None  # PEM root certificate (implies TLS)
    first_packet_frames: int = 0  # 0: the server's default
    packet_frames: int = 0
    seed: int | None = None

    def validated(self) -> TTSConfig:
        if self.voice_id and self.speaker:
            raise ConfigError("give a TTS voice id or a speaker, not both")
        if self.first_packet_frames < 0 or self.packet_frames < 0:
            raise ConfigError("TTS packet sizes must be >= 0 (0 = server default)")
        return self


@dataclass(frozen=True)
class LLMConfig:
    """An OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp, Ollama, ...).
    No URL: say mode (the agent speaks what it is given)."""

    url: str | None = None  # base URL (``http://host:8000/v1``) or the full completions URL
    model: str = "default"
    api_key: str | None = None
    system_prompt: str = (
        "You are a helpful voice assistant. Answer briefly, in plain spoken sentences, without markdown."
    )
    temperature: float | None = None
    max_tokens: int | None = 400
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0  # longest silence between two streamed chunks
    history_messages: int = 40  # user/assistant messages kept (oldest dropped first)
    strip_think: bool = True  # drop <think>...</think> sections (reasoning models) before the TTS


@dataclass(frozen=True)
class ASRConfig:
    """An OpenAI-compatible ``/v1/audio/transcriptions`` endpoint. No URL: voice turns are
    detected (turn events, barge-in) but not transcribed."""

    url: str | None = None  # base URL (``http://host:8000/v1``) or the full transcriptions URL
    model: str = "whisper-1"
    api_key: str | None = None
    language: str | None = None  # ISO-639-1 hint
    timeout_s: float = 30.0


@dataclass(frozen=True)
class IceServer:
    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The browser's RTCIceServer shape."""
        d: dict[str, object] = {"urls": list(self.urls)}
        if self.username is not None:
            d["username"] = self.username
        if self.credential is not None:
            d["credential"] = self.credential
        return d


@dataclass(frozen=True)
class AgentConfig:
    tts: TTSConfig = field(default_factory=TTSConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    asr: ASRConfig = field(default_factory=ASRConfig)
    vad: VadConfig = field(default_factory=VadConfig)
    http_host: str = "127.0.0.1"
    http_port: int = 8080  # 0 picks a free port
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = 9091  # None: no /metrics endpoint; 0 picks a free port
    ice_servers: tuple[IceServer, ...] = ()  # none by default: host candidates only
    # Pin the local ICE host candidates to these addresses (aioice leaves 127.0.0.1 out of
    # its host candidates; loopback tests and single-host setups pin it here).
    ice_host_addresses: tuple[str, ...] = ()
    max_peers: int = 8  # live peer connections; more get 503
    max_offer_bytes: int = 64 * 1024  # POST /offer body; larger get 413
    # POST /offer per client address (token bucket): ``offer_burst`` at once, refilled at
    # ``offer_rate_per_min``; more get 429 with Retry-After. 0 turns the limit off.
    offer_rate_per_min: float = 30.0
    offer_burst: int = 10
    offer_rate_clients: int = 10_000  # client addresses tracked at most (idle ones dropped first)
    max_text_chars: int = 2000  # one typed message from the data channel
    max_message_bytes: int = 16 * 1024  # one data-channel message

    def validated(self) -> AgentConfig:
        self.tts.validated()
        self.vad.validated()
        if self.max_peers < 1:
            raise ConfigError("max_peers must be >= 1")
        if self.max_offer_bytes < 1024:
            raise ConfigError("max_offer_bytes must be >= 1024")
        if self.offer_rate_per_min < 0:
            raise ConfigError("offer_rate_per_min must be >= 0 (0: no rate limit)")
        if self.offer_rate_per_min > 0 and self.offer_burst < 1:
            raise ConfigError("offer_burst must be >= 1")
        if self.offer_rate_clients < 1:
            raise ConfigError("offer_rate_clients must be >= 1")
        if self.max_text_chars < 1:
            raise ConfigError("max_text_chars must be >= 1")
        if not 0 <= self.http_port <= 65535:
            raise ConfigError(f"bad HTTP port {self.http_port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"bad metrics port {self.metrics_port}")
        for s in self.ice_servers:
            for url in s.urls:
                if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                    raise ConfigError(
                        f"ICE server URL must start with stun:, stuns:, turn: or turns: ({url!r})"
                    )
        return self

    @property
    def say_mode(self) -> bool:
        return not self.llm.url
