"""``qwen3tts-agent`` / ``python -m agent``: the command line. The only place settings are parsed."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from agent.config import (
    AgentConfig,
    ASRConfig,
    ConfigError,
    IceServer,
    LLMConfig,
    TTSConfig,
    VadConfig,
)


def build_parser() -> argparse.ArgumentParser:
    d, dv, dl, da = AgentConfig(), VadConfig(), LLMConfig(), ASRConfig()
    ap = argparse.ArgumentParser(
        prog="qwen3tts-agent",
        description="WebRTC voice agent: browser/phone audio <-> VAD turn-taking <-> ASR <-> LLM <-> qwen3tts-rt.",
    )
    ap.add_argument("-v", "--verbose", action="store_true")

    g = ap.add_argument_group("HTTP (page, signalling) and metrics")
    g.add_argument("--host", default=d.http_host, help="listen address (default: %(default)s)")
    g.add_argument(
        "--port", type=int, default=d.http_port, help="HTTP port (default: %(default)s; 0 = any free)"
    )
    g.add_argument("--metrics-host", default=d.metrics_host)
    g.add_argument(
        "--metrics-port",
        type=int,
        default=d.metrics_port,
        help="Prometheus /metrics port (default: %(default)s; -1: off)",
    )
    g.add_argument("--max-peers", type=int, default=d.max_peers, help="calls at once (default: %(default)s)")
    g.add_argument(
        "--max-offer-bytes",
        type=int,
        default=d.max_offer_bytes,
        help="POST /offer body (default: %(default)s)",
    )
    g.add_argument(
        "--offer-rate-per-min",
        type=float,
        default=d.offer_rate_per_min,
        help="POST /offer per client address, sustained (default: %(default)s; 0: no limit)",
    )
    g.add_argument(
        "--offer-burst",
        type=int,
        default=d.offer_burst,
        help="POST /offer per client address at once (default: %(default)s)",
    )

    g = ap.add_argument_group("TTS (a qwen3tts-rt server)")
    g.add_argument("--tts", default=TTSConfig().address, help="server address (default: %(default)s)")
    g.add_argument("--voice", help="voice id (made by CreateVoice / `qwen3tts-rt voice create`)")
    g.add_argument("--speaker", help="built-in speaker (CustomVoice checkpoints), e.g. vivian")
    g.add_argument("--instruct", default="", help="voice description (VoiceDesign) / style")
    g.add_argument("--language", default="auto", help="e.g. english, chinese; auto (default)")
    g.add_argument(
        "--tts-token", default=os.environ.get("QWEN3TTS_RT_TOKEN"), help="bearer token ($QWEN3TTS_RT_TOKEN)"
    )
    g.add_argument("--tts-tls", action="store_true", help="connect with TLS (system roots)")
    g.add_argument("--tts-tls-ca", help="connect with TLS, trusting this root certificate (PEM)")
    g.add_argument("--first-packet-frames", type=int, default=0, help="80 ms frames; 0 = server default")
    g.add_argument("--packet-frames", type=int, default=0, help="80 ms frames; 0 = server default")
    g.add_argument("--seed", type=int, help="TTS sampling seed")

    g = ap.add_argument_group("LLM (OpenAI-compatible /v1/chat/completions; none: say mode)")
    g.add_argument(
        "--llm-url", help="e.g. http://127.0.0.1:8000/v1 (vLLM), :8080/v1 (llama.cpp), :11434/v1 (Ollama)"
    )
    g.add_argument("--llm-model", default=dl.model, help="(default: %(default)s)")
    g.add_argument(
        "--llm-key", default=os.environ.get("QWEN3TTS_AGENT_LLM_KEY"), help="($QWEN3TTS_AGENT_LLM_KEY)"
    )
    g.add_argument("--system-prompt", default=dl.system_prompt)
    g.add_argument("--temperature", type=float)
    g.add_argument("--max-tokens", type=int, default=dl.max_tokens)
    g.add_argument("--keep-think", action="store_true", help="speak <think> sections too (default: dropped)")

    g = ap.add_argument_group(
        "ASR (OpenAI-compatible /v1/audio/transcriptions; none: voice turns are not transcribed)"
    )
    g.add_argument("--asr-url", help="e.g. http://127.0.0.1:8001/v1")
    g.add_argument("--asr-model", default=da.model, help="(default: %(default)s)")
    g.add_argument(
        "--asr-key", default=os.environ.get("QWEN3TTS_AGENT_ASR_KEY"), help="($QWEN3TTS_AGENT_ASR_KEY)"
    )
    g.add_argument("--asr-language", help="ISO-639-1 hint, e.g. en")

    g = ap.add_argument_group("VAD and turn-taking")
    g.add_argument(
        "--vad-aggressiveness", type=int, default=dv.aggressiveness, help="0..3 (default: %(default)s)"
    )
    g.add_argument("--vad-frame-ms", type=int, default=dv.frame_ms, help="10, 20, 30 (default: %(default)s)")
    g.add_argument(
        "--vad-start-ms",
        type=int,
        default=dv.start_ms,
        help="speech that starts a turn (default: %(default)s)",
    )
    g.add_argument(
        "--vad-stop-ms", type=int, default=dv.stop_ms, help="silence that ends a turn (default: %(default)s)"
    )
    g.add_argument("--vad-preroll-ms", type=int, default=dv.preroll_ms, help="(default: %(default)s)")
    g.add_argument("--max-turn-s", type=float, default=dv.max_turn_s, help="(default: %(default)s)")

    g = ap.add_argument_group("ICE (none by default: host candidates only)")
    g.add_argument("--ice-server", action="append", default=[], help="stun:/turn: URL (repeat for more)")
    g.add_argument("--ice-username", help="username for the turn: servers")
    g.add_argument("--ice-credential", help="credential for the turn: servers")
    g.add_argument(
        "--ice-host",
        action="append",
        default=[],
        help="offer exactly these local addresses as host candidates (repeat; e.g. 127.0.0.1)",
    )
    return ap


def config_from_args(a: argparse.Namespace) -> AgentConfig:
    stun = tuple(u for u in a.ice_server if u.startswith(("stun:", "stuns:")))
    turn = tuple(u for u in a.ice_server if not u.startswith(("stun:", "stuns:")))
    ice: list[IceServer] = []
    if stun:
        ice.append(IceServer(stun))
    if turn:
        ice.append(IceServer(turn, a.ice_username, a.ice_credential))
    return AgentConfig(
        tts=TTSConfig(
            address=a.tts,
            voice_id=a.voice,
            speaker=a.speaker,
            instruct=a.instruct,
            language=a.language,
            auth_token=a.tts_token or None,
            tls=a.tts_tls,
            tls_ca=a.tts_tls_ca,
            first_packet_frames=a.first_packet_frames,
            packet_frames=a.packet_frames,
            seed=a.seed,
        ),
        llm=LLMConfig(
            url=a.llm_url,
            model=a.llm_model,
            api_key=a.llm_key or None,
            system_prompt=a.system_prompt,
            temperature=a.temperature,
            max_tokens=a.max_tokens,
            strip_think=not a.keep_think,
        ),
        asr=ASRConfig(url=a.asr_url, model=a.asr_model, api_key=a.asr_key or None, language=a.asr_language),
        vad=VadConfig(
            aggressiveness=a.vad_aggressiveness,
            frame_ms=a.vad_frame_ms,
            start_ms=a.vad_start_ms,
            stop_ms=a.vad_stop_ms,
            preroll_ms=a.vad_preroll_ms,
            max_turn_s=a.max_turn_s,
        ),
        http_host=a.host,
        http_port=a.port,
        metrics_host=a.metrics_host,
        metrics_port=None if a.metrics_port is not None and a.metrics_port < 0 else a.metrics_port,
        ice_servers=tuple(ice),
        ice_host_addresses=tuple(a.ice_host),
        max_peers=a.max_peers,
        max_offer_bytes=a.max_offer_bytes,
        offer_rate_per_min=a.offer_rate_per_min,
        offer_burst=a.offer_burst,
    ).validated()


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    if not a.verbose:
        for noisy in ("aioice", "aiortc"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = config_from_args(a)
    except ConfigError as e:
        print(f"qwen3tts-agent: {e}", file=sys.stderr)
        sys.exit(2)
    from agent.app import serve

    try:
        asyncio.run(serve(config))
    except OSError as e:  # the port is taken, ...
        print(f"qwen3tts-agent: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
