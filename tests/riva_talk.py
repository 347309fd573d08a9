"""A Riva TTS command-line client built only on the stock ``nvidia-riva-client`` package.

NVIDIA's ``talk.py`` (python-clients repository, ``scripts/tts/talk.py``) is not shipped
in the PyPI wheel, so the tests drive this script, which takes the same options and
makes the same library calls on the ``--stream`` and ``--list-voices`` paths:
``riva.client.Auth`` + ``SpeechSynthesisService.synthesize_online`` writing the raw
LINEAR_PCM responses into a WAV file at ``--sample-rate-hz``, and the stub's
``GetRivaSynthesisConfig`` printed as ``{language_code: {"voices": [voice_name.subvoice]}}``.
Set ``RIVA_TALK_PY`` to a checkout's ``talk.py`` to have the tests run that instead.
"""

from __future__ import annotations

import argparse
import json
import time
import wave
from pathlib import Path

import riva.client
from riva.client.argparse_utils import add_connection_argparse_parameters
from riva.client.proto import riva_tts_pb2


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Speech synthesis with a Riva-compatible server")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--text", type=str)
    group.add_argument("--list-voices", action="store_true")
    p.add_argument("--voice")
    p.add_argument("--audio_prompt_file", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("output.wav"))
    p.add_argument("--language-code", default="en-US")
    p.add_argument("--sample-rate-hz", type=int, default=44100)
    p.add_argument("--stream", action="store_true")
    return add_connection_argparse_parameters(p).parse_args()


def main() -> None:
    args = parse_args()
    auth = riva.client.Auth(args.ssl_root_cert, args.use_ssl, args.server, args.metadata)
    service = riva.client.SpeechSynthesisService(auth)
    if args.list_voices:
        resp = service.stub.GetRivaSynthesisConfig(
            riva_tts_pb2.RivaSynthesisConfigRequest(), metadata=auth.get_auth_metadata()
        )
        models: dict[str, dict[str, list[str]]] = {}
        for mc in resp.model_config:
            names = [
                f"{mc.parameters['voice_name']}.{v.split(':')[0]}"
                for v in mc.parameters["subvoices"].split(",")
            ]
            models.setdefault(mc.parameters["language_code"], {"voices": []})["voices"].extend(names)
        print(json.dumps(dict(sorted(models.items())), indent=4))
        return
    with wave.open(str(args.output), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(args.sample_rate_hz)
        start = time.time()
        if args.stream:
            responses = service.synthesize_online(
                args.text,
                args.voice,
                args.language_code,
                sample_rate_hz=args.sample_rate_hz,
                zero_shot_audio_prompt_file=args.audio_prompt_file,
            )
            for i, resp in enumerate(responses):
                if i == 0:
                    print(f"Time to first audio: {time.time() - start:.3f}s")
                out.writeframesraw(resp.audio)
        else:
            resp = service.synthesize(
                args.text,
                args.voice,
                args.language_code,
                sample_rate_hz=args.sample_rate_hz,
                zero_shot_audio_prompt_file=args.audio_prompt_file,
            )
            print(f"Time spent: {time.time() - start:.3f}s")
            out.writeframesraw(resp.audio)


if __name__ == "__main__":
    main()
