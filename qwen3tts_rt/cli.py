"""``qwen3tts-rt`` command line. Configuration is parsed here and nowhere else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import numpy as np

from qwen3tts_rt.engine.packets import POLICIES
from qwen3tts_rt.errors import Qwen3TTSError

DEFAULT_MODEL = "Qwen/Qwen3-TTS-12Hz-0.6B-Base"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint directory or hub id (default: %(default)s)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def _add_voice_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("voice (one of)")
    g.add_argument("--speaker", help="built-in speaker (CustomVoice checkpoints)")
    g.add_argument("--ref-audio", help="reference audio to clone (Base checkpoints)")
    g.add_argument("--ref-text", help="transcript of --ref-audio (ICL cloning)")
    g.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding only")
    g.add_argument("--voice-prompt", help="a saved clone prompt (see `qwen3tts-rt clone`)")
    g.add_argument("--instruct", help="voice/style description (VoiceDesign; 1.7B CustomVoice)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (defaults: the checkpoint's generation_config.json)")
    g.add_argument("--greedy", action="store_true", help="official do_sample=False, subtalker_dosample=False")
    g.add_argument("--seed", type=int, help="seed for reproducible sampling")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--max-new-tokens", type=int, help="codebook-0 tokens to sample at most (frames + 1)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qwen3tts-rt", description="Real-time streaming Qwen3-TTS")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    mk = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official layout")
    mk.add_argument("--preset", default="tiny", choices=["tiny", "0.6b", "1.7b"])
    mk.add_argument("--kind", default="base", choices=["base", "custom_voice", "voice_design"])
    mk.add_argument("--out", required=True)
    mk.add_argument("--seed", type=int, default=0)

    sy = sub.add_parser("synth", help="synthesise a whole text to a WAV file")
    _add_model_args(sy)
    sy.add_argument("--text", required=True)
    sy.add_argument("--language", default="auto")
    _add_voice_args(sy)
    _add_sampling_args(sy)
    sy.add_argument("--out", required=True, help="output WAV (24 kHz mono 16-bit)")
    sy.add_argument("--codes-out", help="codec frames as int64 .npy [frames, 16]")
    sy.add_argument(
        "--non-streaming-mode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="layout (official name): read the whole text before the first frame (yes) or dual-track, "
        "one text token per frame (no); default: the official default for the voice "
        "(yes for built-in speakers and voice design, no for clones)",
    )
    st = sy.add_argument_group("streaming (through the streaming engine)")
    st.add_argument("--stream", action="store_true", help="feed the text in deltas like an LLM would")
    st.add_argument(
        "--text-chunk", type=int, default=4, help="characters per text delta (default %(default)s)"
    )
    st.add_argument("--tokens-per-second", type=float, default=0.0, help="deltas per second; 0 = all at once")
    st.add_argument("--first-packet-frames", type=int, default=1)
    st.add_argument(
        "--packet-policy", choices=POLICIES, default="adaptive", help="later packets (default %(default)s)"
    )
    st.add_argument("--packet-frames", type=int, default=1, help="fixed: frames (80 ms each) per packet")
    st.add_argument("--max-packet-frames", type=int, default=8, help="adaptive: the most frames per packet")
    st.add_argument("--quiet", action="store_true", help="summary only, no per-packet lines")

    cl = sub.add_parser("clone", help="compute a reusable voice clone prompt from reference audio")
    _add_model_args(cl)
    cl.add_argument("--ref-audio", required=True)
    cl.add_argument("--ref-text")
    cl.add_argument("--x-vector-only", action="store_true")
    cl.add_argument("--out", required=True, help="prompt file (.safetensors)")

    _add_server_parsers(sub)
    return ap


# --------------------------------------------------------------------------- server and clients


def _add_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--addr", default="127.0.0.1:50051", help="server address (default: %(default)s)")
    p.add_argument(
        "--auth-token", default=os.environ.get("QWEN3TTS_RT_TOKEN"), help="bearer token ($QWEN3TTS_RT_TOKEN)"
    )
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots)")
    p.add_argument("--tls-ca", help="connect with TLS, trusting this root certificate (PEM)")
    p.add_argument("--timeout", type=float, default=600.0, help="call deadline in seconds")


def _add_server_parsers(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from qwen3tts_rt.server.config import ServerConfig, default_voices_dir

    d = ServerConfig()
    sv = sub.add_parser("serve", help="serve the gRPC API (qwen3tts-rt and Riva-compatible)")
    sv.add_argument(
        "--model", default=DEFAULT_MODEL, help="checkpoint directory or hub id (default: %(default)s)"
    )
    sv.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    sv.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    sv.add_argument("--host", default=d.host, help="listen address (default: %(default)s; 0.0.0.0 for all)")
    sv.add_argument("--port", type=int, default=d.port, help="gRPC port (default: %(default)s; 0 = any free)")
    sv.add_argument("--metrics-host", default=d.metrics_host)
    sv.add_argument(
        "--metrics-port", type=int, default=d.metrics_port, help="Prometheus /metrics port; -1: off"
    )
    sv.add_argument(
        "--openai-port",
        type=int,
        default=d.openai_port,
        help="serve the OpenAI-compatible POST /v1/audio/speech over HTTP on this port (0 = any free); "
        "default: off",
    )
    sv.add_argument("--openai-host", default=d.openai_host, help="listen address of --openai-port")
    sv.add_argument(
        "--voices-dir", type=Path, default=default_voices_dir(), help="voice store (default: %(default)s)"
    )
    sv.add_argument(
        "--voices",
        metavar="DIR_OR_URL",
        help="voice store: a directory, or redis://[:password@]host:port/db (rediss://, unix://) for one "
        "Redis store shared by several servers (Ray Serve replicas); overrides --voices-dir",
    )
    sv.add_argument("--redis-key-prefix", default=d.redis_key_prefix, help="Redis voice store key prefix")
    sv.add_argument(
        "--redis-timeout", type=float, default=d.redis_timeout_s, help="Redis connect/command timeout (s)"
    )
    sv.add_argument("--max-sessions", type=int, default=d.engine.max_sessions, help="live streams at most")
    sv.add_argument(
        "--max-utterance-chars",
        type=int,
        default=d.engine.max_utterance_chars,
        help="text of one utterance, between flushes (default: %(default)s)",
    )
    sv.add_argument(
        "--max-synthesize-chars",
        type=int,
        default=d.max_synthesize_chars,
        help="text of one Synthesize / Riva request (default: %(default)s)",
    )
    sv.add_argument(
        "--max-instruct-chars",
        type=int,
        default=d.max_instruct_chars,
        help="a voice description (default: %(default)s)",
    )
    sv.add_argument("--max-voices", type=int, default=d.max_voices)
    sv.add_argument(
        "--max-buffered-packets",
        type=int,
        default=d.engine.max_buffered_packets,
        help="unread packets per stream before its generation pauses (default: %(default)s)",
    )
    sv.add_argument(
        "--max-pending-utterances",
        type=int,
        default=d.engine.max_pending_utterances,
        help="utterances one stream may queue with flushes (default: %(default)s)",
    )
    sv.add_argument(
        "--max-utterance-key-chars",
        type=int,
        default=d.max_utterance_key_chars,
        help="utterance keys and flush client ids (default: %(default)s)",
    )
    sv.add_argument(
        "--stream-idle-timeout",
        type=float,
        default=d.stream_idle_timeout_s,
        help="seconds a stream may neither send nor receive anything (default: %(default)s)",
    )
    sv.add_argument(
        "--max-stream-duration",
        type=float,
        default=d.max_stream_duration_s,
        help="seconds a stream may stay open (default: %(default)s)",
    )
    sv.add_argument(
        "--clone-workers",
        type=int,
        default=d.clone_workers,
        help="threads decoding reference audio (default: %(default)s)",
    )
    sv.add_argument(
        "--io-workers", type=int, default=d.io_workers, help="voice-store I/O threads (default: %(default)s)"
    )
    fp = sv.add_argument_group("engine fast path (defaults: on for CUDA, off on CPU)")
    fp.add_argument("--static-kv", action=argparse.BooleanOptionalAction, default=None)
    fp.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None)
    fp.add_argument(
        "--max-positions",
        type=int,
        default=d.engine.max_positions,
        help="talker positions per slot in the static cache (default: %(default)s)",
    )
    fp.add_argument(
        "--batch-buckets",
        default="",
        help="comma-separated batch sizes, e.g. 1,2,4,8,16 (default: powers of 2 up to --max-sessions)",
    )
    fp.add_argument("--attention", default=d.engine.attention, choices=["auto", "sdpa", "flash"])
    fp.add_argument(
        "--frame-cap-base",
        type=int,
        default=d.engine.frame_cap.base_frames,
        help="frames an utterance may produce: base + per-token x text tokens (default: %(default)s)",
    )
    fp.add_argument("--frame-cap-per-token", type=int, default=d.engine.frame_cap.frames_per_token)
    fp.add_argument(
        "--eager-tokenizer",
        action=argparse.BooleanOptionalAction,
        default=d.engine.eager_tokenizer,
        help="emit tokens inside an unfinished word / CJK run once provably final (default: on)",
    )
    sv.add_argument(
        "--max-voice-jobs",
        type=int,
        default=d.max_voice_jobs,
        help="voice clonings queued or running at once (default: %(default)s)",
    )
    sv.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=d.max_concurrent_rpcs,
        help="RPCs in flight, streams included (default: %(default)s)",
    )
    sv.add_argument(
        "--max-unauthenticated-rpcs",
        type=int,
        default=d.max_unauthenticated_rpcs,
        help="health calls (they need no token) in flight; at most half of --max-concurrent-rpcs "
        "(default: %(default)s)",
    )
    sv.add_argument(
        "--max-health-watches",
        type=int,
        default=d.max_health_watches,
        help="health Watch streams among them (default: %(default)s)",
    )
    sv.add_argument(
        "--first-packet-frames", type=int, default=d.engine.first_packet_frames, help="default, 80 ms each"
    )
    sv.add_argument(
        "--packet-policy",
        choices=POLICIES,
        default=d.engine.packet_policy,
        help="later packets: adaptive (frames held back and decoded together while the listener is "
        "ahead, up to --max-packet-frames) or fixed (--packet-frames each) (default: %(default)s)",
    )
    sv.add_argument(
        "--packet-frames", type=int, default=d.engine.packet_frames, help="fixed policy, 80 ms each"
    )
    sv.add_argument(
        "--max-packet-frames",
        type=int,
        default=d.engine.max_packet_frames,
        help="adaptive policy (default: 8)",
    )
    sv.add_argument(
        "--packet-margin-s",
        type=float,
        default=d.engine.packet_margin_s,
        help="adaptive: lead over playback kept beyond the packet being grown (default: %(default)s)",
    )
    sv.add_argument("--default-voice", help="voice id or speaker for requests that name none (Riva clients)")
    sv.add_argument(
        "--auth-token",
        default=os.environ.get("QWEN3TTS_RT_TOKEN"),
        help="require this bearer token ($QWEN3TTS_RT_TOKEN)",
    )
    sv.add_argument(
        "--metrics-auth-token",
        default=os.environ.get("QWEN3TTS_RT_METRICS_TOKEN"),
        help="require 'Authorization: Bearer <this>' on /metrics ($QWEN3TTS_RT_METRICS_TOKEN; "
        "may equal --auth-token; default: /metrics is open to whoever reaches --metrics-host)",
    )
    sv.add_argument("--tls-cert", type=Path, help="PEM certificate chain (with --tls-key): serve TLS")
    sv.add_argument("--tls-key", type=Path, help="PEM private key")
    sv.add_argument("--grace", type=float, default=d.drain_grace_s, help="SIGTERM drain grace in seconds")
    sv.add_argument("--no-warmup", action="store_true", help="report SERVING without a warm-up utterance")
    sv.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's choice)")
    r = d.ref_audio
    g = sv.add_argument_group("reference audio: what decoding may allocate")
    g.add_argument(
        "--ref-audio-max-sample-rate",
        type=int,
        default=r.max_sample_rate,
        help="input rate in Hz at most (default: %(default)s)",
    )
    g.add_argument(
        "--ref-audio-max-channels", type=int, default=r.max_channels, help="(default: %(default)s)"
    )
    g.add_argument(
        "--ref-audio-max-decoded-bytes",
        type=int,
        default=r.max_decoded_bytes,
        help="decoded samples (float32, all channels) at most; decoding stops past it (default: %(default)s)",
    )
    g = sv.add_argument_group("reference audio from URLs (ref_audio_url; off by default)")
    g.add_argument(
        "--allow-ref-audio-urls",
        action="store_true",
        help="download reference audio named by ref_audio_url (http/https only, same size limit)",
    )
    g.add_argument(
        "--ref-audio-url-timeout",
        type=float,
        default=d.ref_audio_url_timeout_s,
        help="seconds for a whole download, redirects included (default: %(default)s)",
    )
    g.add_argument(
        "--ref-audio-url-max-redirects",
        type=int,
        default=d.ref_audio_url_max_redirects,
        help="redirects followed at most (default: %(default)s)",
    )
    g.add_argument(
        "--ref-audio-url-allow-private",
        action="store_true",
        help="also fetch from loopback/private/link-local addresses (default: refused)",
    )
    g.add_argument(
        "--ref-audio-url-max-concurrent",
        type=int,
        default=d.ref_audio_url_max_concurrent,
        help="downloads at once (default: %(default)s)",
    )

    sy = sub.add_parser("say", help="stream a text token by token to a server, like an LLM; write a WAV")
    _add_client_args(sy)
    sy.add_argument("--text", required=True)
    g = sy.add_argument_group("voice (one of)")
    g.add_argument("--voice", help="voice id (see `qwen3tts-rt voice list`)")
    g.add_argument("--speaker", help="built-in speaker (CustomVoice checkpoints)")
    g.add_argument("--ref-audio", help="reference audio to clone inline (not stored)")
    g.add_argument("--ref-text", help="transcript of --ref-audio")
    g.add_argument("--x-vector-only", action="store_true")
    sy.add_argument("--instruct", help="voice description (VoiceDesign) / style")
    sy.add_argument("--language", default="auto")
    sy.add_argument("--tokens-per-second", type=float, default=20.0, help="text rate; 0 = all at once")
    sy.add_argument("--sample-rate", type=int, default=24000, help="output rate in Hz")
    sy.add_argument("--first-packet-frames", type=int, default=0, help="0 = server default")
    sy.add_argument(
        "--packet-frames", type=int, default=0, help="fixed packets of this size; 0 = server default"
    )
    sy.add_argument("--packet-policy", choices=POLICIES, help="default: the server's")
    sy.add_argument("--max-packet-frames", type=int, default=0, help="adaptive bound; 0 = server default")
    sy.add_argument("--greedy", action="store_true")
    sy.add_argument("--seed", type=int)
    sy.add_argument("--temperature", type=float)
    sy.add_argument("--max-new-tokens", type=int)
    sy.add_argument("--out", required=True, help="output WAV (16-bit mono)")
    nx = sy.add_argument_group("more utterances on the same stream, each with its own voice (in order)")
    nx.add_argument(
        "--next-speaker",
        nargs=2,
        action="append",
        default=[],
        metavar=("SPEAKER", "TEXT"),
        dest="next",
        type=str,
        help="then say TEXT with this built-in speaker",
    )
    nx.add_argument(
        "--next-voice",
        nargs=2,
        action="append",
        default=[],
        metavar=("VOICE_ID", "TEXT"),
        dest="next_voice",
        help="then say TEXT with this stored voice",
    )

    vo = sub.add_parser("voice", help="manage the server's stored voices")
    vsub = vo.add_subparsers(dest="voice_cmd", required=True)
    vc = vsub.add_parser("create", help="clone a voice from reference audio; prints its id")
    _add_client_args(vc)
    src = vc.add_mutually_exclusive_group(required=True)
    src.add_argument("--ref-audio", help="WAV/FLAC/MP3/OGG/M4A file")
    src.add_argument(
        "--ref-audio-url", help="http(s) URL the server downloads the audio from (if it allows URLs)"
    )
    vc.add_argument("--ref-text", default="", help="its transcript (ICL cloning); omit with --x-vector-only")
    vc.add_argument("--x-vector-only", action="store_true")
    vc.add_argument("--name", default="", help="display name")
    vl = vsub.add_parser("list", help="list stored voices")
    _add_client_args(vl)
    vd = vsub.add_parser("delete", help="delete a stored voice")
    _add_client_args(vd)
    vd.add_argument("voice_id")


def _sampling_kwargs(a: argparse.Namespace) -> dict[str, object]:
    kw: dict[str, object] = {
        "temperature": a.temperature,
        "top_k": a.top_k,
        "top_p": a.top_p,
        "repetition_penalty": a.repetition_penalty,
        "max_new_tokens": a.max_new_tokens,
        "seed": a.seed,
    }
    if a.greedy:
        kw.update(do_sample=False, subtalker_dosample=False)
    return {k: v for k, v in kw.items() if v is not None}


def _voice(tts, a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from qwen3tts_rt.engine.voices import VoiceClonePrompt, voice_prompt

    clone = None
    if a.voice_prompt:
        clone = VoiceClonePrompt.load(a.voice_prompt)
    elif a.ref_audio:
        clone = tts.create_voice_clone_prompt(a.ref_audio, a.ref_text, a.x_vector_only)
        for note in clone.notes:
            print(f"note: {note}", file=sys.stderr)
    return voice_prompt(tts.ckpt, speaker=a.speaker, clone=clone, instruct=a.instruct)


def cmd_make_checkpoint(a: argparse.Namespace) -> None:
    from qwen3tts_rt.model.fabricate import make_checkpoint

    out = make_checkpoint(a.out, preset=a.preset, kind=a.kind, seed=a.seed)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"wrote {a.preset} {a.kind} checkpoint (random weights, seed {a.seed}) to {out} ({size / 1e6:.1f} MB)"
    )


def cmd_synth(a: argparse.Namespace) -> None:
    from qwen3tts_rt.api import Qwen3TTS
    from qwen3tts_rt.audio import write_wav

    device, dtype = _auto_device(a.device, a.dtype)
    tts = Qwen3TTS.from_pretrained(a.model, dtype=dtype, device=device)
    voice = _voice(tts, a)
    if a.non_streaming_mode is None:
        from qwen3tts_rt.model.prompt import default_non_streaming_mode

        a.non_streaming_mode = default_non_streaming_mode(voice)
    if a.stream:
        _synth_stream(tts, voice, a)
        return
    res = tts.synthesize(a.text, a.language, voice, a.non_streaming_mode, **_sampling_kwargs(a))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_wav(a.out, res.wav, res.sample_rate)
    if a.codes_out:
        np.save(a.codes_out, res.frames.numpy().astype(np.int64))
    t = res.timings
    print(
        f"{a.out}: {res.frames.shape[0]} frames, {res.audio_seconds:.2f} s of audio at {res.sample_rate} Hz "
        f"(finished by {res.finish.value}, {'whole-text' if a.non_streaming_mode else 'dual-track'} layout); "
        f"first frame {t['first_frame_s'] * 1000:.0f} ms, "
        f"total {t['total_s']:.2f} s, RTF {t['rtf']:.3f}"
    )


def _synth_stream(tts, voice, a: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    import threading
    import time

    from qwen3tts_rt.audio import write_wav
    from qwen3tts_rt.engine.engine import Engine, EngineConfig
    from qwen3tts_rt.engine.messages import PcmPacket, SessionError, UtteranceDone

    kw = _sampling_kwargs(a)
    params, seed = tts.sampling(**kw)
    engine = Engine(tts.ckpt, EngineConfig(max_sessions=1))
    try:
        s = engine.open_session(
            voice,
            a.language,
            params,
            seed=seed,
            non_streaming_mode=a.non_streaming_mode,
            first_packet_frames=a.first_packet_frames,
            packet_frames=a.packet_frames,
            packet_policy=a.packet_policy,
            max_packet_frames=a.max_packet_frames,
        )
        step = max(a.text_chunk, 1)
        deltas = [a.text[i : i + step] for i in range(0, len(a.text), step)]
        period = 1.0 / a.tokens_per_second if a.tokens_per_second > 0 else 0.0
        t0 = time.perf_counter()

        def feed() -> None:
            for i, d in enumerate(deltas):
                if period:
                    time.sleep(max(0.0, t0 + i * period - time.perf_counter()))
                s.push_text(d)
            s.end_text()

        threading.Thread(target=feed, daemon=True).start()
        pcm: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        gaps: list[float] = []
        last: float | None = None
        sr = tts.ckpt.codec.sample_rate
        for m in s.messages(timeout=600):
            if isinstance(m, PcmPacket):
                t = m.emitted_at - t0
                gap: float | None = None if last is None else t - last
                if gap is not None:
                    gaps.append(gap)
                last = t
                pcm.append(m.pcm)
                codes.append(m.codes)
                if not a.quiet:
                    g = "" if gap is None else f"  gap {gap * 1000:6.1f} ms"
                    print(
                        f"packet {m.seq:4d}  frames {m.frame_start:4d}-{m.frame_end:<4d} at {t * 1000:8.1f} ms"
                        f"{g}  read {m.chars_consumed}/{len(a.text)} chars"
                    )
            elif isinstance(m, UtteranceDone):
                wall = time.perf_counter() - t0
                ttfp = (m.first_packet_latency_s or 0) * 1000
                print(
                    f"first packet {ttfp:.0f} ms after the first text delta; {m.frames} frames, "
                    f"{m.audio_seconds:.2f} s audio (finished by {m.reason}); RTF {m.rtf or 0:.3f} compute, "
                    f"{wall / max(m.audio_seconds, 1e-9):.3f} wall; "
                    f"gap p50 {1000 * float(np.median(gaps) if gaps else 0):.1f} ms, "
                    f"max {1000 * max(gaps, default=0):.1f} ms"
                )
            elif isinstance(m, SessionError):
                raise SystemExit(f"error: {m.message}")
        wav = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        write_wav(a.out, wav, sr)
        if a.codes_out:
            np.save(a.codes_out, np.concatenate(codes).astype(np.int64))
        print(f"{a.out}: {len(wav) / sr:.2f} s of audio at {sr} Hz")
    finally:
        engine.shutdown()


def cmd_clone(a: argparse.Namespace) -> None:
    from qwen3tts_rt.api import Qwen3TTS

    device, dtype = _auto_device(a.device, a.dtype)
    tts = Qwen3TTS.from_pretrained(a.model, dtype=dtype, device=device)
    prompt = tts.create_voice_clone_prompt(a.ref_audio, a.ref_text, a.x_vector_only)
    prompt.save(a.out)
    mode = "x-vector only" if prompt.x_vector_only else f"ICL, {prompt.ref_codes.shape[0]} reference frames"  # type: ignore[union-attr]
    for note in prompt.notes:
        print(f"note: {note}")
    print(f"wrote voice clone prompt ({mode}) to {a.out}")


def _auto_device(device: str, dtype: str) -> tuple[str, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def cmd_serve(a: argparse.Namespace) -> None:
    import asyncio
    import dataclasses

    from qwen3tts_rt.engine.engine import EngineConfig
    from qwen3tts_rt.engine.generation import FrameCap
    from qwen3tts_rt.server.app import serve
    from qwen3tts_rt.server.config import ServerConfig

    device, dtype = _auto_device(a.device, a.dtype)
    try:
        buckets = tuple(int(b) for b in a.batch_buckets.split(",") if b.strip())
        engine = EngineConfig(
            max_sessions=a.max_sessions,
            first_packet_frames=a.first_packet_frames,
            packet_policy=a.packet_policy,
            packet_frames=a.packet_frames,
            max_packet_frames=a.max_packet_frames,
            packet_margin_s=a.packet_margin_s,
            max_utterance_chars=a.max_utterance_chars,
            max_buffered_packets=a.max_buffered_packets,
            max_pending_utterances=a.max_pending_utterances,
            frame_cap=FrameCap(a.frame_cap_base, a.frame_cap_per_token),
            static_kv=a.static_kv,
            cuda_graphs=a.cuda_graphs,
            max_positions=a.max_positions,
            batch_buckets=buckets,
            attention=a.attention,
            eager_tokenizer=a.eager_tokenizer,
        )
        config = ServerConfig(
            model=a.model,
            device=device,
            dtype=dtype,
            host=a.host,
            port=a.port,
            metrics_host=a.metrics_host,
            metrics_port=None if a.metrics_port is not None and a.metrics_port < 0 else a.metrics_port,
            openai_host=a.openai_host,
            openai_port=a.openai_port,
            voices_dir=Path(a.voices) if a.voices and "://" not in a.voices else a.voices_dir,
            voices_url=a.voices if a.voices and "://" in a.voices else None,
            redis_key_prefix=a.redis_key_prefix,
            redis_timeout_s=a.redis_timeout,
            engine=engine,
            max_synthesize_chars=a.max_synthesize_chars,
            max_instruct_chars=a.max_instruct_chars,
            max_voices=a.max_voices,
            max_voice_jobs=a.max_voice_jobs,
            max_concurrent_rpcs=a.max_concurrent_rpcs,
            max_unauthenticated_rpcs=a.max_unauthenticated_rpcs,
            max_health_watches=a.max_health_watches,
            ref_audio=dataclasses.replace(
                ServerConfig().ref_audio,
                max_sample_rate=a.ref_audio_max_sample_rate,
                max_channels=a.ref_audio_max_channels,
                max_decoded_bytes=a.ref_audio_max_decoded_bytes,
            ),
            default_voice=a.default_voice,
            auth_token=a.auth_token or None,
            metrics_auth_token=a.metrics_auth_token or None,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            drain_grace_s=a.grace,
            max_utterance_key_chars=a.max_utterance_key_chars,
            stream_idle_timeout_s=a.stream_idle_timeout,
            max_stream_duration_s=a.max_stream_duration,
            clone_workers=a.clone_workers,
            io_workers=a.io_workers,
            warmup=not a.no_warmup,
            torch_threads=a.torch_threads,
            allow_ref_audio_urls=a.allow_ref_audio_urls,
            ref_audio_url_timeout_s=a.ref_audio_url_timeout,
            ref_audio_url_max_redirects=a.ref_audio_url_max_redirects,
            ref_audio_url_allow_private=a.ref_audio_url_allow_private,
            ref_audio_url_max_concurrent=a.ref_audio_url_max_concurrent,
        ).validated()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    asyncio.run(serve(config))


def _client(a: argparse.Namespace):  # type: ignore[no-untyped-def]
    from qwen3tts_rt.server.client import auth_metadata, connect
    from qwen3tts_rt.v1 import tts_pb2_grpc

    channel = connect(a.addr, tls_ca=a.tls_ca, tls=a.tls)
    return tts_pb2_grpc.TextToSpeechStub(channel), auth_metadata(a.auth_token)


def _rpc_error(e: Exception) -> int:
    import grpc

    if isinstance(e, grpc.RpcError):
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    raise e


def cmd_say(a: argparse.Namespace) -> None:
    from qwen3tts_rt.audio import write_wav
    from qwen3tts_rt.server.client import format_say, say
    from qwen3tts_rt.v1 import tts_pb2 as pb

    stub, md = _client(a)
    cfg = pb.StreamConfig(
        language=a.language,
        sample_rate_hz=a.sample_rate,
        first_packet_frames=a.first_packet_frames,
        packet_frames=a.packet_frames,
        packet_policy=f"PACKET_POLICY_{(a.packet_policy or 'unspecified').upper()}",
        max_packet_frames=a.max_packet_frames,
        instruct=a.instruct or "",
    )
    if a.voice:
        cfg.voice_id = a.voice
    elif a.speaker:
        cfg.speaker = a.speaker
    elif a.ref_audio:
        cfg.clone.ref_audio = Path(a.ref_audio).read_bytes()
        cfg.clone.ref_text = a.ref_text or ""
        cfg.clone.x_vector_only = a.x_vector_only
    if a.greedy:
        cfg.sampling.greedy = True
    if a.temperature is not None:
        cfg.sampling.temperature = a.temperature
    if a.max_new_tokens is not None:
        cfg.sampling.max_new_tokens = a.max_new_tokens
    if a.seed is not None:
        cfg.seed = a.seed
    more = [(pb.UtteranceOptions(speaker=name), text) for name, text in a.next]
    more += [(pb.UtteranceOptions(voice_id=vid), text) for vid, text in a.next_voice]
    res = say(
        stub, cfg, a.text, tokens_per_second=a.tokens_per_second, metadata=md, timeout=a.timeout, more=more
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_wav(a.out, res.pcm, res.sample_rate)
    print(format_say(res, a.out))


def cmd_voice(a: argparse.Namespace) -> None:
    from qwen3tts_rt.v1 import tts_pb2 as pb

    stub, md = _client(a)
    if a.voice_cmd == "create":
        v = stub.CreateVoice(
            pb.CreateVoiceRequest(
                ref_audio=Path(a.ref_audio).read_bytes() if a.ref_audio else b"",
                ref_audio_url=a.ref_audio_url or "",
                ref_text=a.ref_text,
                x_vector_only=a.x_vector_only,
                display_name=a.name,
            ),
            metadata=md,
            timeout=a.timeout,
        )
        for note in v.notes:
            print(f"note: {note}", file=sys.stderr)
        print(v.voice_id)
    elif a.voice_cmd == "list":
        voices = stub.ListVoices(pb.ListVoicesRequest(), metadata=md, timeout=a.timeout).voices
        for v in voices:
            mode = "x-vector" if v.x_vector_only else "icl"
            print(f"{v.voice_id}\t{mode}\t{v.ref_audio_seconds:.1f}s\t{v.display_name}")
        if not voices:
            print("(no voices)", file=sys.stderr)
    else:
        stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=a.voice_id), metadata=md, timeout=a.timeout)
        print(f"deleted {a.voice_id}")


COMMANDS = {
    "make-checkpoint": cmd_make_checkpoint,
    "synth": cmd_synth,
    "clone": cmd_clone,
    "serve": cmd_serve,
    "say": cmd_say,
    "voice": cmd_voice,
}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        COMMANDS[a.cmd](a)
    except Qwen3TTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        return _rpc_error(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
