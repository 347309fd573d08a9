"""Security rules of the server: reference audio from URLs (off by default; http(s) only;
size, time and redirect limits; no credentials; no private addresses unless allowed),
bearer-token auth and TLS where tests/test_server_ops.py leaves gaps, voice ids that cannot
be guessed, voice ids and names that cannot reach a file outside the store, and gRPC
message limits that follow the reference-audio byte limit."""

from __future__ import annotations

import base64
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen3tts_rt.audio import ReferenceAudioRules
from qwen3tts_rt.errors import CapacityError
from qwen3tts_rt.model.checkpoint import Checkpoint
from qwen3tts_rt.server.app import ServerThread
from qwen3tts_rt.server.config import ServerConfig
from qwen3tts_rt.server.ref_fetch import FetchLimits, RefAudioFetcher, RefAudioUrlError
from qwen3tts_rt.server.voice_store import VOICE_ID_BYTES, is_valid_voice_id, new_voice_id
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.reliability import record
from tests.server_helpers import collect, rpc_error, start_server

pytestmark = pytest.mark.usefixtures("one_torch_thread")

AUDIO_LIMIT = 400_000  # a small reference-audio byte limit keeps the big-body cases quick
URL_TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def ckpt(tiny_loaded: Callable[..., Checkpoint]) -> Checkpoint:
    return tiny_loaded("base", 0)


@pytest.fixture(scope="module")
def good_wav(speech_wav: Callable[..., bytes]) -> bytes:
    return speech_wav(1.2, seed=3)


def greedy_clone(clone: pb.ClonePrompt, frames: int = 3) -> pb.StreamConfig:
    return pb.StreamConfig(clone=clone, sampling=pb.SamplingParams(greedy=True, max_new_tokens=frames))


def stream(stub: pb_grpc.TextToSpeechStub, cfg: pb.StreamConfig) -> int:
    got = collect(stub.StreamSynthesize(iter([pb.StreamRequest(config=cfg), pb.StreamRequest(text="Hi.")])))
    return sum(d.frames for d in got.dones)


def invalid(err: grpc.RpcError, *fragments: str) -> str:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    for f in fragments:
        assert f in err.details(), (f, err.details())
    return str(err.details())


# --------------------------------------------------------------------------- a local HTTP server


class AudioSite:
    """An HTTP server on 127.0.0.1 with the good and the bad ways of serving a file."""

    def __init__(self, wav: bytes) -> None:
        self.wav = wav
        self.hits: collections.Counter[str] = collections.Counter()
        self.stop = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if "Content-Length" not in (headers or {}) and body is not None:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                site.hits[path] += 1
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self._route(path)  # the fetcher may hang up: the point of several routes

            def _route(self, path: str) -> None:
                if path == "/good.wav":
                    self._send(200, site.wav, {"Content-Type": "audio/wav"})
                elif path == "/text":
                    self._send(200, b"<html>not audio</html>" * 10, {"Content-Type": "text/html"})
                elif path == "/empty":
                    self._send(200, b"")
                elif path == "/missing":
                    self._send(404, b"no such file")
                elif path == "/big-announced":
                    self.send_response(200)
                    self.send_header("Content-Length", str(AUDIO_LIMIT + 1))
                    self.end_headers()
                    self.wfile.write(site.wav[:1000])
                    site.stop.wait(5)
                elif path == "/big-unannounced":  # no Content-Length: the body runs until close
                    self.send_response(200)
                    self.end_headers()
                    self.wfile.write(site.wav[:44])
                    for _ in range(2 * AUDIO_LIMIT // 8192 + 2):
                        self.wfile.write(b"\1" * 8192)
                elif path == "/lying-length":  # announces less than it sends
                    self.send_response(200)
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"\1" * (2 * AUDIO_LIMIT))
                elif path == "/slow":  # a byte trickle that would take 100 s
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(site.wav)))
                    self.end_headers()
                    for i in range(0, len(site.wav), 100):
                        self.wfile.write(site.wav[i : i + 100])
                        self.wfile.flush()
                        if site.stop.wait(0.1):
                            return
                elif path == "/stall":  # never answers at all
                    site.stop.wait(10)
                elif path == "/to-good":
                    self._send(302, headers={"Location": "/good.wav"})
                elif path == "/to-file":
                    self._send(302, headers={"Location": "file:///etc/passwd"})
                elif path == "/to-ftp":
                    self._send(301, headers={"Location": "ftp://127.0.0.1/x.wav"})
                elif path == "/to-data":
                    self._send(307, headers={"Location": "data:audio/wav;base64,UklGRg=="})
                elif path == "/to-creds":
                    self._send(302, headers={"Location": f"http://u:p@127.0.0.1:{site.port}/good.wav"})
                elif path == "/no-location":
                    self._send(302)
                elif path == "/loop":
                    self._send(302, headers={"Location": "/loop"})
                elif path.startswith("/chain/"):
                    n = int(path.rsplit("/", 1)[1])
                    self._send(302, headers={"Location": f"/chain/{n - 1}" if n > 0 else "/good.wav"})
                else:
                    self._send(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def site(good_wav: bytes) -> Iterator[AudioSite]:
    s = AudioSite(good_wav)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def url_server(ckpt: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    srv = start_server(
        ckpt,
        tmp_path_factory.mktemp("url-voices"),
        warmup=False,
        allow_ref_audio_urls=True,
        ref_audio_url_allow_private=True,  # the test site is on 127.0.0.1
        ref_audio_url_timeout_s=URL_TIMEOUT_S,
        ref_audio_url_max_redirects=3,
        ref_audio=ReferenceAudioRules(max_bytes=AUDIO_LIMIT),
    )
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def url_stub(url_server: ServerThread) -> Iterator[pb_grpc.TextToSpeechStub]:
    with grpc.insecure_channel(url_server.address) as ch:
        yield pb_grpc.TextToSpeechStub(ch)


# --------------------------------------------------------------------------- reference audio from URLs


def test_urls_are_refused_unless_enabled(
    ckpt: Checkpoint, tmp_path: Path, site: AudioSite, good_wav: bytes
) -> None:
    assert ServerConfig().allow_ref_audio_urls is False
    srv = start_server(ckpt, tmp_path / "voices", warmup=False)
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            before = sum(site.hits.values())
            err = rpc_error(
                lambda: stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio_url=site.url("/good.wav"), x_vector_only=True)
                )
            )
            msg = invalid(err, "ref_audio_url", "allow_ref_audio_urls", "--allow-ref-audio-urls")
            clone = pb.ClonePrompt(ref_audio_url=site.url("/good.wav"), x_vector_only=True)
            err = rpc_error(lambda: stream(stub, greedy_clone(clone)))
            invalid(err, "config.clone.ref_audio_url", "allow_ref_audio_urls")
            assert sum(site.hits.values()) == before  # nothing was fetched
            assert stub.ListVoices(pb.ListVoicesRequest()).voices == []
    finally:
        srv.stop()
    record("security", "ref_audio_url when not enabled", code="INVALID_ARGUMENT", message=msg)


def test_voice_from_a_url(url_stub: pb_grpc.TextToSpeechStub, site: AudioSite, good_wav: bytes) -> None:
    t0 = time.monotonic()
    v = url_stub.CreateVoice(
        pb.CreateVoiceRequest(ref_audio_url=site.url("/good.wav"), x_vector_only=True, display_name="url")
    )
    took = time.monotonic() - t0
    assert is_valid_voice_id(v.voice_id) and v.ref_audio_seconds == pytest.approx(1.2, abs=0.01)
    # the downloaded bytes stand for the request: the same audio sent inline is the same voice
    same = url_stub.CreateVoice(
        pb.CreateVoiceRequest(ref_audio=good_wav, x_vector_only=True, display_name="url")
    )
    assert same.voice_id == v.voice_id
    via = url_stub.CreateVoice(
        pb.CreateVoiceRequest(ref_audio_url=site.url("/to-good"), x_vector_only=True, display_name="url")
    )
    assert via.voice_id == v.voice_id  # a redirect to the same file
    chained = url_stub.CreateVoice(
        pb.CreateVoiceRequest(ref_audio_url=site.url("/chain/2"), x_vector_only=True, display_name="url")
    )
    assert chained.voice_id == v.voice_id  # 3 redirects: the limit, still followed
    clone = pb.ClonePrompt(ref_audio_url=site.url("/good.wav"), ref_text="Some words.")
    assert stream(url_stub, greedy_clone(clone)) == 2
    record("security", "voice created from a URL (local http.server)", seconds=round(took, 3))


URL_ERRORS = [
    ("/missing", ["HTTP 404"]),
    ("/big-announced", ["announces 400001 bytes", "0.38147 MiB"]),
    ("/big-unannounced", ["more than 400000 bytes"]),
    ("/lying-length", []),  # the length it announced is all that is read: a truncated WAV
    ("/text", ["not in a recognised audio format"]),
    ("/empty", ["empty body"]),
    ("/slow", [f"longer than {URL_TIMEOUT_S:g} s", "ref_audio_url_timeout_s"]),
    ("/stall", [f"longer than {URL_TIMEOUT_S:g} s"]),
    ("/to-file", ["redirects to a URL that is refused", "'file:'", "only http:// and https://"]),
    ("/to-ftp", ["'ftp:'"]),
    ("/to-data", ["'data:'"]),
    ("/to-creds", ["credentials"]),
    ("/no-location", ["without a Location"]),
    ("/loop", ["redirected more than 3 times", "ref_audio_url_max_redirects"]),
    ("/chain/4", ["redirected more than 3 times"]),
]


@pytest.mark.parametrize(("path", "fragments"), URL_ERRORS, ids=[p for p, _ in URL_ERRORS])
def test_bad_downloads_are_clear_errors(
    url_stub: pb_grpc.TextToSpeechStub, site: AudioSite, path: str, fragments: list[str]
) -> None:
    t0 = time.monotonic()
    err = rpc_error(
        lambda: url_stub.CreateVoice(
            pb.CreateVoiceRequest(ref_audio_url=site.url(path), x_vector_only=True), timeout=30
        )
    )
    took = time.monotonic() - t0
    msg = invalid(err, "ref_audio_url", *fragments)
    assert "?" not in msg  # never the query of a URL (it may hold a signature)
    assert took < URL_TIMEOUT_S + 3.0, f"{path} took {took:.1f} s"
    clone = pb.ClonePrompt(ref_audio_url=site.url(path), x_vector_only=True)
    invalid(rpc_error(lambda: stream(url_stub, greedy_clone(clone))), "config.clone.ref_audio_url")
    record("security", f"ref_audio_url {path}", code=err.code().name, message=msg, seconds=round(took, 2))


BAD_URLS = [
    ("file:///etc/passwd", "'file:'"),
    ("FILE:///etc/passwd", "'file:'"),
    ("ftp://127.0.0.1/a.wav", "'ftp:'"),
    ("data:audio/wav;base64," + base64.b64encode(b"RIFF").decode(), "'data:'"),
    ("gopher://127.0.0.1/", "'gopher:'"),
    ("//127.0.0.1/good.wav", "no scheme"),
    ("/etc/passwd", "no scheme"),
    ("http://user:secret@127.0.0.1/good.wav", "credentials"),
    ("http://:secret@127.0.0.1/good.wav", "credentials"),
    ("http:///good.wav", "no host"),
    ("http://127.0.0.1/a b.wav", "spaces or control characters"),
    ("http://127.0.0.1/\x00.wav", "spaces or control characters"),
    ("http://127.0.0.1:99999/good.wav", "not a valid URL"),
    ("http://127.0.0.1/" + "a" * 5000, "at most 4096"),
]


@pytest.mark.parametrize(("url", "fragment"), BAD_URLS, ids=[u[:30] for u, _ in BAD_URLS])
def test_only_plain_http_urls_are_fetched(
    url_stub: pb_grpc.TextToSpeechStub, site: AudioSite, url: str, fragment: str
) -> None:
    before = sum(site.hits.values())
    err = rpc_error(
        lambda: url_stub.CreateVoice(pb.CreateVoiceRequest(ref_audio_url=url, x_vector_only=True))
    )
    msg = invalid(err, "ref_audio_url", fragment)
    assert "secret" not in msg
    assert sum(site.hits.values()) == before


def test_audio_and_url_together_is_an_error(
    url_stub: pb_grpc.TextToSpeechStub, site: AudioSite, good_wav: bytes
) -> None:
    err = rpc_error(
        lambda: url_stub.CreateVoice(
            pb.CreateVoiceRequest(ref_audio=good_wav, ref_audio_url=site.url("/good.wav"), x_vector_only=True)
        )
    )
    invalid(err, "ref_audio_url", "not both")


def test_private_addresses_are_refused_unless_allowed(site: AudioSite) -> None:
    before = sum(site.hits.values())
    fetcher = RefAudioFetcher(FetchLimits(max_bytes=AUDIO_LIMIT, timeout_s=2))
    for host in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0", "[::ffff:127.0.0.1]"):
        with pytest.raises(RefAudioUrlError, match=r"non-public address|cannot connect") as e:
            fetcher.fetch(f"http://{host}:{site.port}/good.wav")
        assert "ref_audio_url_allow_private" in str(e.value) or "cannot connect" in str(e.value)
    assert sum(site.hits.values()) == before
    allowed = RefAudioFetcher(FetchLimits(max_bytes=AUDIO_LIMIT, timeout_s=2, allow_private=True))
    assert allowed.fetch(site.url("/good.wav")) == site.wav
    assert ServerConfig().ref_audio_url_allow_private is False
    record("security", "ref_audio_url to loopback when private hosts are not allowed", refused=5)


def test_concurrent_downloads_are_bounded(site: AudioSite) -> None:
    fetcher = RefAudioFetcher(
        FetchLimits(max_bytes=AUDIO_LIMIT, timeout_s=URL_TIMEOUT_S, allow_private=True, max_concurrent=1)
    )
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            fetcher.fetch(site.url("/stall"))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=slow)
    hits = site.hits["/stall"]
    t.start()
    try:
        deadline = time.monotonic() + 5
        while site.hits["/stall"] == hits and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(CapacityError, match="ref_audio_url_max_concurrent"):
            fetcher.fetch(site.url("/good.wav"))
    finally:
        t.join(10)
    assert errors and isinstance(errors[0], RefAudioUrlError)
    assert fetcher.fetch(site.url("/good.wav")) == site.wav  # the slot is free again


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_certificates_are_verified(tmp_path: Path, good_wav: bytes) -> None:
    import ssl

    cert, key = _self_signed(tmp_path, "audio-host")
    site = AudioSite(good_wav)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    site.httpd.socket = ctx.wrap_socket(site.httpd.socket, server_side=True)
    try:
        fetcher = RefAudioFetcher(FetchLimits(max_bytes=AUDIO_LIMIT, timeout_s=5, allow_private=True))
        with pytest.raises(RefAudioUrlError, match="CERTIFICATE_VERIFY_FAILED"):
            fetcher.fetch(f"https://127.0.0.1:{site.port}/good.wav")  # self-signed: not trusted
    finally:
        site.close()


# --------------------------------------------------------------------------- auth and TLS (the gaps)


def _self_signed(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}-cert.pem", tmp / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_refuses_clients_that_do_not_trust_the_certificate(
    ckpt: Checkpoint, tmp_path: Path, good_wav: bytes
) -> None:
    cert, key = _self_signed(tmp_path, "server")
    other, _ = _self_signed(tmp_path, "someone-else")
    srv = start_server(ckpt, tmp_path / "voices", tls_cert=cert, tls_key=key, auth_token="tok", warmup=False)
    try:
        refused: dict[str, str] = {}
        for label, roots in (("system roots", None), ("another certificate", other.read_bytes())):
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            with grpc.secure_channel(srv.address, creds) as ch:
                err = rpc_error(
                    lambda ch=ch: pb_grpc.TextToSpeechStub(ch).GetServerInfo(  # type: ignore[misc]
                        pb.GetServerInfoRequest(), metadata=[("authorization", "Bearer tok")], timeout=5
                    )
                )
                assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
                refused[label] = err.code().name
        good = [("authorization", "Bearer tok")]
        with grpc.secure_channel(srv.address, grpc.ssl_channel_credentials(cert.read_bytes())) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            err = rpc_error(lambda: stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=5))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED  # TLS alone is not enough
            assert (
                stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=good, timeout=10).model_kind == "base"
            )
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING  # health needs no token
    finally:
        srv.stop()
    record("security", "TLS client without the server's CA", **refused)


def test_auth_guards_every_voice_call_and_riva(ckpt: Checkpoint, tmp_path: Path, good_wav: bytes) -> None:
    from riva.client.proto import riva_tts_pb2, riva_tts_pb2_grpc

    srv = start_server(ckpt, tmp_path / "voices", auth_token="s3cret", warmup=False)
    good = [("authorization", "Bearer s3cret")]
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            vid = stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=good_wav, x_vector_only=True), metadata=good
            ).voice_id
            riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(ch)
            calls: list[Callable[[list[tuple[str, str]]], object]] = [
                lambda md: stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=good_wav, x_vector_only=True, display_name="x"), metadata=md),
                lambda md: stub.GetVoice(pb.GetVoiceRequest(voice_id=vid), metadata=md),
                lambda md: stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=vid), metadata=md),
                lambda md: stub.Synthesize(pb.SynthesizeRequest(text="x"), metadata=md).next(),  # type: ignore[attr-defined]
                lambda md: riva.GetRivaSynthesisConfig(riva_tts_pb2.RivaSynthesisConfigRequest(), metadata=md),
                lambda md: riva.Synthesize(riva_tts_pb2.SynthesizeSpeechRequest(text="x", voice_name=vid), metadata=md),
            ]  # fmt: skip
            for call in calls:
                for md in ([], [("authorization", "Bearer S3CRET")], [("authorization", "Bearer s3cret ")],
                           [("authorization", "Basic s3cret")], [("authorization", "Bearer")]):  # fmt: skip
                    err = rpc_error(lambda call=call, md=md: call(md))  # type: ignore[misc]
                    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
            listed = stub.ListVoices(pb.ListVoicesRequest(), metadata=good).voices
            assert [v.voice_id for v in listed] == [vid]  # nothing was created or deleted
    finally:
        srv.stop()
    record("security", "bearer token on every voice call and the Riva API", calls=len(calls), wrong_forms=5)


# --------------------------------------------------------------------------- voice ids and names


def test_voice_ids_are_unguessable(
    url_stub: pb_grpc.TextToSpeechStub, speech_wav: Callable[..., bytes]
) -> None:
    assert VOICE_ID_BYTES * 8 >= 96
    ids = [new_voice_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(i) == 16 and is_valid_voice_id(i) for i in ids)  # 16 x 6 bits = 96 bits
    # the characters are uniform over the 64 URL-safe symbols (chi-square, 63 degrees of freedom)
    counts = collections.Counter("".join(ids))
    assert set(counts) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    expected = 16 * 1000 / 64
    chi2 = sum(
        (counts.get(c, 0) - expected) ** 2 / expected
        for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )
    assert chi2 < 140, chi2  # p < 1e-7 under uniformity
    made = {
        url_stub.CreateVoice(
            pb.CreateVoiceRequest(ref_audio=speech_wav(1.1, seed=20 + i), x_vector_only=True)
        ).voice_id
        for i in range(5)
    }
    assert len(made) == 5 and all(len(v) == 16 and is_valid_voice_id(v) for v in made)
    record(
        "security",
        "voice ids",
        bits=VOICE_ID_BYTES * 8,
        distinct_of_1000=len(set(ids)),
        chi2_63dof=round(chi2, 1),
    )


ESCAPES = [
    "../sentinel",
    "../sentinel.json",
    "..%2Fsentinel",
    "..",
    ".",
    "",
    "/etc/passwd",
    "PLACEHOLDER_ABS",  # an absolute path to the sentinel
    "voices/../../sentinel",
    "abcdefgh\x00../sentinel",
    "abcdefgh/../../sentinel",
    "a" * 10_000,
    "ＡＢＣＤＥＦＧＨ",  # fullwidth letters
    "PLACEHOLDER_HOMOGLYPH",  # a real id with one letter swapped for a Cyrillic look-alike
    "PLACEHOLDER_REAL.json",  # a real id with a suffix
    "PLACEHOLDER_REAL_NUL",  # a real id with a NUL byte after it
]


class FileWatch:
    """Every file the process opens, removes or renames while ``on`` (an audit hook)."""

    installed: FileWatch | None = None

    def __init__(self) -> None:
        self.on = False
        self.paths: list[tuple[str, str]] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.on and event in ("open", "os.remove", "os.rename", "os.replace", "os.rmdir", "os.mkdir",
                                 "os.truncate", "os.symlink", "os.link", "os.chmod", "shutil.rmtree"):  # fmt: skip
            p = args[0] if args else None
            if isinstance(p, str | bytes | os.PathLike):
                self.paths.append((event, os.fsdecode(p)))

    @classmethod
    def get(cls) -> FileWatch:
        if cls.installed is None:
            cls.installed = FileWatch()
            sys.addaudithook(cls.installed)
        return cls.installed


def test_voice_ids_cannot_reach_outside_the_store(ckpt: Checkpoint, tmp_path: Path, good_wav: bytes) -> None:
    from riva.client.proto import riva_tts_pb2, riva_tts_pb2_grpc

    root = tmp_path / "store"
    voices = root / "voices"
    sentinels = [root / n for n in ("sentinel", "sentinel.json", "sentinel.safetensors")]
    for s in sentinels:
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_text("keep me")
    srv = start_server(ckpt, voices, warmup=False)
    watch = FileWatch.get()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            riva = riva_tts_pb2_grpc.RivaSpeechSynthesisStub(ch)
            real = stub.CreateVoice(pb.CreateVoiceRequest(ref_audio=good_wav, x_vector_only=True)).voice_id
            letter = next(c for c in real if c in "aeopcxyAEOPCXY")
            glyph = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у",
                     "A": "А", "E": "Е", "O": "О", "P": "Р", "C": "С", "X": "Х", "Y": "У"}[letter]  # fmt: skip
            ids = [
                {"PLACEHOLDER_ABS": str(root / "sentinel"), "PLACEHOLDER_HOMOGLYPH": real.replace(letter, glyph, 1),
                 "PLACEHOLDER_REAL.json": real + ".json", "PLACEHOLDER_REAL_NUL": real + "\x00"}.get(i, i)
                for i in ESCAPES
            ]  # fmt: skip
            stream(stub, greedy_clone(pb.ClonePrompt(ref_audio=good_wav, x_vector_only=True)))  # warm paths
            files_before = sorted(p.name for p in voices.iterdir())
            codes: collections.Counter[str] = collections.Counter()
            watch.paths.clear()
            watch.on = True
            try:
                for vid in ids:
                    riva_call = lambda v=vid: riva.Synthesize(  # noqa: E731
                        riva_tts_pb2.SynthesizeSpeechRequest(text="x", voice_name=v)
                    )
                    for call, want in (
                        (lambda v=vid: stub.GetVoice(pb.GetVoiceRequest(voice_id=v)), grpc.StatusCode.NOT_FOUND),
                        (lambda v=vid: stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=v)), grpc.StatusCode.NOT_FOUND),
                        (lambda v=vid: stream(stub, pb.StreamConfig(voice_id=v)), grpc.StatusCode.INVALID_ARGUMENT),
                        (riva_call, grpc.StatusCode.INVALID_ARGUMENT),
                    ):  # fmt: skip
                        if vid == "" and call is riva_call:
                            continue  # an empty Riva voice_name means the default voice (documented)
                        err = rpc_error(call)  # type: ignore[arg-type]
                        assert err.code() == want, (repr(vid[:40]), err.code(), err.details())
                        assert len(err.details()) < 600  # a 10,000-character id is not echoed whole
                        codes[err.code().name] += 1
            finally:
                watch.on = False
            touched = [(e, p) for e, p in watch.paths if Path(p).resolve().is_relative_to(tmp_path)]
            outside = [(e, p) for e, p in touched if not Path(p).resolve().is_relative_to(voices.resolve())]
            assert not outside, outside
            assert not [(e, p) for e, p in watch.paths if "passwd" in p or "sentinel" in p]
            assert all(s.read_text() == "keep me" for s in sentinels)
            assert sorted(p.name for p in voices.iterdir()) == files_before
            assert [v.voice_id for v in stub.ListVoices(pb.ListVoicesRequest()).voices] == [real]
            assert (
                stream(
                    stub,
                    pb.StreamConfig(voice_id=real, sampling=pb.SamplingParams(greedy=True, max_new_tokens=3)),
                )
                == 2
            )
    finally:
        srv.stop()
    record("security", "voice ids that try to leave the store", ids=len(ids), calls=sum(codes.values()),
           files_touched_outside=0, **dict(codes))  # fmt: skip


def test_display_names_are_data(
    url_stub: pb_grpc.TextToSpeechStub, url_server: ServerThread, speech_wav: Callable[..., bytes]
) -> None:
    voices = url_server.server.config.voices_dir
    names = ["../../sentinel", "/etc/passwd", "a/b\\c:d*e?f", "..", "<script>alert(1)</script>", "名前 ① ﬁ"]
    for i, name in enumerate(names):
        before = {p.name for p in voices.iterdir()}
        v = url_stub.CreateVoice(
            pb.CreateVoiceRequest(
                ref_audio=speech_wav(1.1, seed=40 + i), x_vector_only=True, display_name=name
            )
        )
        assert v.display_name == name
        assert url_stub.GetVoice(pb.GetVoiceRequest(voice_id=v.voice_id)).display_name == name
        assert {p.name for p in voices.iterdir()} - before == {
            f"{v.voice_id}.json",
            f"{v.voice_id}.safetensors",
        }
    for bad in ("nul\x00byte", "new\nline", "x" * 201):
        err = rpc_error(
            lambda bad=bad: url_stub.CreateVoice(
                pb.CreateVoiceRequest(ref_audio=speech_wav(1.1), x_vector_only=True, display_name=bad)
            )
        )  # type: ignore[misc]
        invalid(err, "display_name")
    assert not (voices.parent / "sentinel").exists()


# --------------------------------------------------------------------------- message size limits


def _limits_server(ckpt: Checkpoint, voices: Path, max_bytes: int) -> ServerThread:
    return start_server(ckpt, voices, warmup=False, ref_audio=ReferenceAudioRules(max_bytes=max_bytes))


@pytest.mark.parametrize("max_bytes", [300_000, 2_000_000])
def test_message_limit_follows_the_audio_limit(
    ckpt: Checkpoint, tmp_path: Path, good_wav: bytes, max_bytes: int
) -> None:
    srv = _limits_server(ckpt, tmp_path / "voices", max_bytes)
    limit = srv.server.config.max_receive_bytes
    assert limit == ServerConfig(ref_audio=ReferenceAudioRules(max_bytes=max_bytes)).max_receive_bytes
    assert max_bytes < limit < max_bytes + 2 * 1024 * 1024
    try:
        with grpc.insecure_channel(srv.address, options=[("grpc.max_send_message_length", -1)]) as ch:
            stub = pb_grpc.TextToSpeechStub(ch)
            info = stub.GetServerInfo(pb.GetServerInfoRequest())
            assert (info.limits.max_message_bytes, info.limits.max_ref_audio_bytes) == (limit, max_bytes)

            def create(n: int, data: bytes = b"") -> pb.Voice:
                audio = data or good_wav + b"\0" * (n - len(good_wav))
                return stub.CreateVoice(
                    pb.CreateVoiceRequest(ref_audio=audio, x_vector_only=True), timeout=60
                )

            assert create(len(good_wav), good_wav).voice_id  # valid audio under both limits
            invalid(rpc_error(lambda: create(max_bytes + 1)), "ref_audio", "at most")  # the audio rule
            invalid(rpc_error(lambda: create(limit - 64)), "ref_audio", "at most")  # still reaches it
            err = rpc_error(lambda: create(limit + 1))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
            clone = pb.ClonePrompt(ref_audio=b"\0" * (limit + 1), x_vector_only=True)
            err2 = rpc_error(lambda: stream(stub, pb.StreamConfig(clone=clone)))
            assert err2.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            if max_bytes == 2_000_000:  # a message over the 300 kB server's limit is valid audio here
                small = ServerConfig(ref_audio=ReferenceAudioRules(max_bytes=300_000)).max_receive_bytes
                assert small + 1 < max_bytes and create(small + 1).voice_id
    finally:
        srv.stop()
    record("security", f"gRPC receive limit with ref_audio.max_bytes={max_bytes}", max_receive_bytes=limit,
           over_message_limit=err.code().name, message=err.details())  # fmt: skip


# --------------------------------------------------------------------------- command line


def test_serve_and_voice_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from qwen3tts_rt import cli
    from qwen3tts_rt.server import app

    seen: list[ServerConfig] = []

    async def fake_serve(config: ServerConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(app, "serve", fake_serve)
    base = ["serve", "--model", "m", "--device", "cpu", "--dtype", "float32"]
    cli.cmd_serve(cli.build_parser().parse_args(base))
    assert (seen[-1].allow_ref_audio_urls, seen[-1].ref_audio_url_allow_private) == (False, False)
    assert (seen[-1].ref_audio_url_timeout_s, seen[-1].ref_audio_url_max_redirects) == (10.0, 3)
    cli.cmd_serve(
        cli.build_parser().parse_args(
            [*base, "--allow-ref-audio-urls", "--ref-audio-url-timeout", "2.5", "--ref-audio-url-max-redirects",
             "0", "--ref-audio-url-allow-private", "--ref-audio-url-max-concurrent", "2"]
        )
    )  # fmt: skip
    c = seen[-1]
    assert (c.allow_ref_audio_urls, c.ref_audio_url_timeout_s, c.ref_audio_url_max_redirects) == (
        True,
        2.5,
        0,
    )
    assert (c.ref_audio_url_allow_private, c.ref_audio_url_max_concurrent) == (True, 2)
    with pytest.raises(SystemExit, match="ref_audio_url_timeout_s"):
        cli.cmd_serve(cli.build_parser().parse_args([*base, "--ref-audio-url-timeout", "0"]))

    a = cli.build_parser().parse_args(["voice", "create", "--ref-audio-url", "https://example.org/me.wav"])
    assert (a.ref_audio, a.ref_audio_url) == (None, "https://example.org/me.wav")
    for bad in (
        ["voice", "create"],
        ["voice", "create", "--ref-audio", "a.wav", "--ref-audio-url", "http://x/"],
    ):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(bad)


def test_voice_create_from_a_url_on_the_command_line(
    url_server: ServerThread, site: AudioSite, capsys: pytest.CaptureFixture[str]
) -> None:
    from qwen3tts_rt import cli

    args = ["voice", "create", "--addr", url_server.address, "--x-vector-only", "--name", "cli-url"]
    assert cli.main([*args, "--ref-audio-url", site.url("/good.wav")]) == 0
    vid = capsys.readouterr().out.strip()
    assert is_valid_voice_id(vid)
    assert cli.main([*args, "--ref-audio-url", site.url("/missing")]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "ref_audio_url" in err and "HTTP 404" in err
