"""The Ray Serve application on a local Ray cluster: 2 CPU replicas of a tiny checkpoint,
voices in a shared Redis started by the test, every call through Ray's gRPC proxy on
loopback. The same bytes as the direct server, a voice created once speaking on both
replicas, a client cancel freeing the replica's session, a killed replica (the stream
on it ends with a clear status, new streams succeed, Ray replaces it), and a drain.

One cluster for the module (starting Ray and two replicas costs most of the time).
Replicas take at most one call each (``max_ongoing_requests=1``), so two concurrent
calls land on two different replicas: the tests place streams, they do not guess."""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen3tts_rt.model.checkpoint import load_checkpoint
from qwen3tts_rt.v1 import tts_pb2 as pb
from qwen3tts_rt.v1 import tts_pb2_grpc as pb_grpc
from tests.server_helpers import BidiCall, collect, greedy, start_server, wait_for
from tests.test_voice_store_redis import REDIS_SERVER, RedisServer

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install -e '.[ray]'")
pytest.importorskip("redis", reason="the redis client is not installed: pip install -e '.[ray]'")
pytestmark = pytest.mark.timeout(900)  # each test, the cluster's start included: a hung Ray fails

import ray  # noqa: E402
from ray import serve  # noqa: E402
from riva.client.proto import riva_audio_pb2 as riva_audio  # noqa: E402
from riva.client.proto import riva_tts_pb2 as rtts  # noqa: E402
from riva.client.proto import riva_tts_pb2_grpc as rtts_grpc  # noqa: E402

from qwen3tts_rt.server.ray_app import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    REPLICA_METADATA_KEY,
    RayAppConfig,
    build_app,
    grpc_options,
    patient_proxy_env,
)
from qwen3tts_rt.server.ray_proxy import GRPC_SERVICER_FUNCTIONS  # noqa: E402

MD = (("application", APP_NAME),)
REPLICAS = 2
START_TIMEOUT_S = 300.0  # two replicas importing torch on a busy 2-core machine
REPLACE_TIMEOUT_S = 300.0
CALL_TIMEOUT_S = 120.0
TEXT = ["Hello ", "there, ", "how are ", "you today?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    grpc_address: str
    redis: RedisServer
    key_prefix: str
    checkpoint: Path
    startup_s: float

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_address)


def _greedy_checkpoint(src: Path, dst: Path, max_new_tokens: int) -> Path:
    """``src`` with greedy, short defaults (Riva requests cannot ask for them)."""
    shutil.copytree(src, dst)
    gen_path = dst / "generation_config.json"
    gen = json.loads(gen_path.read_text())
    gen.update(do_sample=False, subtalker_dosample=False, max_new_tokens=max_new_tokens)
    gen_path.write_text(json.dumps(gen, indent=2))
    return dst


@pytest.fixture(scope="module")
def cluster(
    tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (make system-deps installs Debian's)")
    ckpt = _greedy_checkpoint(tiny_checkpoint("base"), tmp_path_factory.mktemp("ray") / "tiny", 24)
    redis_srv = RedisServer().start()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    t0 = time.monotonic()
    patient_proxy_env()  # a loaded CI host starts the proxy's worker in more than Ray's 5 s
    try:
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=128 * 2**20,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
        port = _free_port()
        serve.start(
            http_options={"host": "127.0.0.1", "port": _free_port()},
            grpc_options=grpc_options(port),
        )
        cfg = RayAppConfig.from_args(
            dict(
                model=str(ckpt),
                num_gpus=0,
                num_cpus=0.5,
                num_replicas=REPLICAS,
                max_ongoing_requests=1,
                max_sessions=2,
                voices_url=redis_srv.url,
                redis_key_prefix=prefix,
                warmup=False,
                torch_threads=1,
                drain_grace_s=30,
                health_check_period_s=2,
                # tests compare audio bit for bit (replica against replica, Riva unary against
                # online); adaptive packets, the default, group frames by timing and a different
                # grouping may differ in the last bit
                packet_policy="fixed",
            )
        )
        serve.run(build_app(config=cfg), name=APP_NAME, route_prefix=f"/{APP_NAME}")  # waits for RUNNING
        assert wait_for(lambda: _running_replicas() == REPLICAS, START_TIMEOUT_S, 0.5), serve.status()
        yield Cluster(f"127.0.0.1:{port}", redis_srv, prefix, ckpt, time.monotonic() - t0)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            redis_srv.stop()
            shutil.rmtree(temp_dir, ignore_errors=True)


def _running_replicas() -> int:
    app = serve.status().applications.get(APP_NAME)
    if app is None or app.status != "RUNNING":
        return 0
    dep = app.deployments[DEPLOYMENT_NAME]
    return int(dep.replica_states.get("RUNNING", 0))


def replica_actors() -> dict[str, Any]:
    """{replica id: actor handle} of the live replicas."""
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        name = a["name"]
        if name.startswith(f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"):
            with contextlib.suppress(ValueError):  # died meanwhile
                out[name.rsplit("#", 1)[1]] = ray.get_actor(name, namespace=a["namespace"])
    return out


def routing_stats() -> dict[str, dict[str, Any]]:
    stats = {}
    for rid, actor in replica_actors().items():
        with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            stats[rid] = ray.get(actor.record_routing_stats.remote(), timeout=30)
    return stats


def replica_of(call: Any) -> str:
    return dict(call.trailing_metadata() or ())[REPLICA_METADATA_KEY]


def stream_requests(
    voice_id: str, frames: int, text: list[str] = TEXT, **kw: object
) -> list[pb.StreamRequest]:
    return [
        pb.StreamRequest(config=greedy(voice_id, frames, **kw)),
        *(pb.StreamRequest(text=t) for t in text),
    ]


def first_audio(call: BidiCall) -> Iterator[pb.StreamResponse]:
    """The call's responses, once its first audio chunk has arrived (which it yields again)."""
    it = iter(call)
    seen = []
    for r in it:
        seen.append(r)
        if r.WhichOneof("response") == "audio":
            break
    return itertools.chain(seen, it)


@pytest.fixture(scope="module")
def voice_id(cluster: Cluster, speech_wav: Callable[..., bytes]) -> str:
    with cluster.channel() as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        req = pb.CreateVoiceRequest(ref_audio=speech_wav(1.5), x_vector_only=True, display_name="ray")
        v = stub.CreateVoice(req, metadata=MD, timeout=CALL_TIMEOUT_S)
    return v.voice_id


# --------------------------------------------------------------------------- settings (no cluster)


def test_the_serve_run_config_deploys_as_written() -> None:
    """deploy/ray_serve.yaml passes Ray's schema and the application's own checks; its
    autoscaling aims at target_utilization * max_sessions ongoing calls per replica."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "ray_serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICER_FUNCTIONS
    app = raw["applications"][0]
    assert app["import_path"] == "qwen3tts_rt.server.ray_app:build_app" and app["name"] == APP_NAME
    cfg = RayAppConfig.from_args(app["args"])
    opts = cfg.deployment_options()
    assert opts["ray_actor_options"]["num_gpus"] == 1 and opts["max_ongoing_requests"] == 16
    assert opts["autoscaling_config"]["target_ongoing_requests"] == 12  # 0.75 * 16
    assert opts["graceful_shutdown_timeout_s"] == 30
    assert cfg.server.voices_url == "redis://qwen3tts-redis:6379/0" and cfg.server.device == "cuda"


def test_the_proxy_imports_no_model_code() -> None:
    """Every registration the proxy imports resolves without torch or numpy: the proxy
    answers Serve's readiness check in seconds even on a loaded node (importing the model
    code made a loaded host's proxy miss it, and Serve killed the proxy)."""
    import subprocess
    import sys

    check = (
        "import importlib, sys\n"
        "from qwen3tts_rt.server.ray_proxy import GRPC_SERVICER_FUNCTIONS\n"
        "for path in GRPC_SERVICER_FUNCTIONS:\n"
        "    module, _, name = path.rpartition('.')\n"
        "    assert callable(getattr(importlib.import_module(module), name)), path\n"
        "print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_settings_are_checked() -> None:
    ok = {"voices_url": "redis://127.0.0.1:6379/0"}
    for bad, match in (
        ({"no_such_setting": 1}, "unknown setting 'no_such_setting'"),
        ({"max_sessions": "many"}, "'max_sessions': 'many' is not an integer"),
        ({"target_utilization": 0}, "target_utilization"),
        ({"min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"num_replicas": 0}, "num_replicas"),
        ({"voices_url": None, "num_replicas": 2}, "shared voice store"),
        ({"voices_url": "http://x"}, "voices_url"),
    ):
        with pytest.raises(ValueError, match=match):
            RayAppConfig.from_args({**ok, **bad})
    one = RayAppConfig.from_args({"num_replicas": "1", "warmup": "false", "max_ongoing_requests": "3"})
    assert one.server.voices_url is None and not one.server.warmup  # one replica: a directory will do
    assert one.deployment_options()["num_replicas"] == 1 and one.ongoing_per_replica == 3


# --------------------------------------------------------------------------- the API through the proxy


def test_every_service_answers_through_the_proxy(cluster: Cluster, voice_id: str) -> None:
    with cluster.channel() as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        info = stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=MD, timeout=CALL_TIMEOUT_S)
        assert info.model_kind == "base" and info.limits.max_sessions == 2
        listed = stub.ListVoices(pb.ListVoicesRequest(), metadata=MD, timeout=CALL_TIMEOUT_S).voices
        assert [v.voice_id for v in listed] == [voice_id]
        got = stub.GetVoice(pb.GetVoiceRequest(voice_id=voice_id), metadata=MD, timeout=CALL_TIMEOUT_S)
        assert got.display_name == "ray"
        # domain errors keep their status and message through the proxy
        with pytest.raises(grpc.RpcError) as info_err:
            stub.GetVoice(pb.GetVoiceRequest(voice_id="NoSuchVoice0000"), metadata=MD, timeout=CALL_TIMEOUT_S)
        assert info_err.value.code() == grpc.StatusCode.NOT_FOUND
        bad = [pb.StreamRequest(config=greedy(voice_id, 4, sample_rate_hz=12345)), pb.StreamRequest(text="x")]
        with pytest.raises(grpc.RpcError) as bad_err:
            list(stub.StreamSynthesize(iter(bad), metadata=MD, timeout=CALL_TIMEOUT_S))
        assert bad_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_err.value.details().startswith("config.sample_rate_hz"), bad_err.value.details()
        # Synthesize (server streaming) and a throwaway voice deleted again
        packets = list(
            stub.Synthesize(
                pb.SynthesizeRequest(text="Hello there.", config=greedy(voice_id, 4)),
                metadata=MD,
                timeout=CALL_TIMEOUT_S,
            )
        )
        assert packets and packets[-1].last and sum(len(p.audio) for p in packets) > 0
        # Riva: its unary Synthesize shares the method name with ours
        riva = rtts_grpc.RivaSpeechSynthesisStub(ch)
        cfg = riva.GetRivaSynthesisConfig(
            rtts.RivaSynthesisConfigRequest(), metadata=MD, timeout=CALL_TIMEOUT_S
        )
        assert cfg.model_config
        req = rtts.SynthesizeSpeechRequest(
            text="Hello there.",
            language_code="en-US",
            encoding=riva_audio.LINEAR_PCM,
            sample_rate_hz=24000,
            voice_name=voice_id,
        )
        resp = riva.Synthesize(req, metadata=MD, timeout=CALL_TIMEOUT_S)
        assert len(resp.audio) > 0
        online = list(riva.SynthesizeOnline(iter([req]), metadata=MD, timeout=CALL_TIMEOUT_S))
        assert b"".join(r.audio for r in online) == resp.audio  # greedy defaults: the same speech
        # health through the proxy, and Ray's own check on every replica
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), metadata=MD, timeout=30).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
    for actor in replica_actors().values():
        assert ray.get(actor.check_health.remote(), timeout=60) is None


def test_greedy_stream_through_the_proxy_matches_the_direct_server(
    cluster: Cluster, voice_id: str, tmp_path: Path, one_torch_thread: None
) -> None:
    reqs = [
        # the direct server's default is adaptive: this call asks for the cluster's fixed packets
        *stream_requests(voice_id, 8, packet_policy=pb.PACKET_POLICY_FIXED),
        pb.StreamRequest(flush=pb.Flush()),
        pb.StreamRequest(text="Bye now."),
    ]
    with cluster.channel() as ch:
        call = pb_grpc.TextToSpeechStub(ch).StreamSynthesize(iter(reqs), metadata=MD, timeout=CALL_TIMEOUT_S)
        via_ray = collect(call)
    ckpt = load_checkpoint(cluster.checkpoint)
    with (
        start_server(
            ckpt,
            tmp_path / "unused",
            voices_url=cluster.redis.url,  # the same store: the voice made through Ray
            redis_key_prefix=cluster.key_prefix,
            warmup=False,
        ) as direct,
        grpc.insecure_channel(direct.address) as ch,
    ):
        direct_out = collect(
            pb_grpc.TextToSpeechStub(ch).StreamSynthesize(iter(reqs), timeout=CALL_TIMEOUT_S)
        )
    assert len(via_ray.dones) == len(direct_out.dones) == 2
    for a, b in zip(via_ray.dones, direct_out.dones):
        assert (a.utterance_id, a.frames, a.reason) == (b.utterance_id, b.frames, b.reason)
    for uid in (d.utterance_id for d in direct_out.dones):
        assert via_ray.pcm(uid).size > 0
        assert bytes(via_ray.audio[uid]) == bytes(direct_out.audio[uid])  # the same bytes
    assert [(c.utterance_id, c.sample_offset) for c in via_ray.chunks] == [
        (c.utterance_id, c.sample_offset) for c in direct_out.chunks
    ]


def test_a_voice_created_through_the_proxy_speaks_on_both_replicas(
    cluster: Cluster, speech_wav: Callable[..., bytes]
) -> None:
    with cluster.channel() as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        req = pb.CreateVoiceRequest(ref_audio=speech_wav(1.5, seed=3), x_vector_only=True)
        v, call = stub.CreateVoice.with_call(req, metadata=MD, timeout=CALL_TIMEOUT_S)
        made_on = replica_of(call)
        held = BidiCall(stub, metadata=MD, timeout=CALL_TIMEOUT_S)  # occupies one replica ...
        rest = first_audio(held.send(config=greedy(v.voice_id, 6)).text(*TEXT).flush())
        other = stub.StreamSynthesize(  # ... so this one goes to the other
            iter(stream_requests(v.voice_id, 6)), metadata=MD, timeout=CALL_TIMEOUT_S
        )
        second = collect(other)
        held.close()
        first = collect(rest)
        assert replica_of(held.call) != replica_of(other)
        assert made_on in {replica_of(held.call), replica_of(other)}
        assert len(first.dones) == len(second.dones) == 1 and second.pcm(0).size > 0
        assert bytes(first.audio[0]) == bytes(second.audio[0])  # one voice, the same speech on both


def test_a_client_cancel_frees_the_replica_session(cluster: Cluster, voice_id: str) -> None:
    with cluster.channel() as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        call = BidiCall(stub, metadata=MD, timeout=CALL_TIMEOUT_S)
        call.send(config=greedy(voice_id, 2000)).text("A long text that keeps going " * 40)
        first_audio(call)
        busy = {rid: s["live_sessions"] for rid, s in routing_stats().items()}
        assert sorted(busy.values()) == [0, 1], busy
        call.cancel()
        assert wait_for(lambda: all(s["live_sessions"] == 0 for s in routing_stats().values()), 60, 0.2)
        # both replicas take a stream again (max_ongoing_requests=1: Ray's slot was freed too)
        calls = [
            stub.StreamSynthesize(iter(stream_requests(voice_id, 4)), metadata=MD, timeout=CALL_TIMEOUT_S)
            for _ in range(2)
        ]
        outs = [collect(c) for c in calls]
        assert all(o.dones for o in outs) and {replica_of(c) for c in calls} == set(busy)


def test_killing_a_replica(cluster: Cluster, voice_id: str) -> None:
    """The stream on the killed replica ends INTERNAL "The actor died ..." (docs/DEPLOY.md:
    the client reopens it with the text not yet spoken); new streams go to the live replica
    at once, and to both again once Ray has replaced the dead one."""
    before = set(replica_actors())
    with cluster.channel() as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        call = BidiCall(stub, metadata=MD, timeout=CALL_TIMEOUT_S)
        call.send(config=greedy(voice_id, 2000)).text("A long text that keeps going " * 40)
        rest = first_audio(call)
        victim = next(rid for rid, s in routing_stats().items() if s["live_sessions"] == 1)
        ray.kill(replica_actors()[victim], no_restart=True)
        with pytest.raises(grpc.RpcError) as info:
            for _ in rest:
                pass
        err = info.value
        # Ray's proxy: INTERNAL, "The actor died unexpectedly before finishing this task. ..."
        assert err.code() == grpc.StatusCode.INTERNAL, err
        assert err.details().startswith("The actor died"), err.details()
        # a new stream succeeds right away (the live replica; Ray skips the dead one)
        done = collect(
            stub.StreamSynthesize(iter(stream_requests(voice_id, 4)), metadata=MD, timeout=CALL_TIMEOUT_S)
        )
        assert done.dones
        assert wait_for(
            lambda: _running_replicas() == REPLICAS and len(set(replica_actors()) - before) == 1,
            REPLACE_TIMEOUT_S,
            0.5,
        ), serve.status()
        new = (set(replica_actors()) - before).pop()
        seen: set[str] = set()
        calls: list[Any] = []
        outs: list[Any] = []
        lock = threading.Lock()

        def one() -> None:
            c = stub.StreamSynthesize(iter(stream_requests(voice_id, 4)), metadata=MD, timeout=CALL_TIMEOUT_S)
            out = collect(c)
            with lock:
                calls.append(c)
                outs.append(out)
                seen.add(replica_of(c))

        # the router may still count the new replica as starting: a few rounds of two at once
        for _ in range(10):
            threads = [threading.Thread(target=one) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(CALL_TIMEOUT_S)
            if new in seen:
                break
        assert new in seen and victim not in seen and all(o.dones for o in outs)


def test_deleting_the_app_drains_streams_in_flight(cluster: Cluster, voice_id: str) -> None:
    """Last: Ray's graceful shutdown lets a stream in flight finish, then stops the engine."""
    with cluster.channel() as ch:
        stub = pb_grpc.TextToSpeechStub(ch)
        call = BidiCall(stub, metadata=MD, timeout=CALL_TIMEOUT_S)
        call.send(config=greedy(voice_id, 12)).text("Finish this sentence please.")
        rest = first_audio(call)
        deleting = threading.Thread(target=serve.delete, args=(APP_NAME,), daemon=True)
        deleting.start()
        call.flush().close()
        out = collect(rest)  # the stream ends normally
        assert [d.reason for d in out.dones] in ([pb.UtteranceDone.EOS], [pb.UtteranceDone.CAP])
        deleting.join(120)
        assert not deleting.is_alive()
        with pytest.raises(grpc.RpcError) as info:
            stub.GetServerInfo(pb.GetServerInfoRequest(), metadata=MD, timeout=30)
        assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
