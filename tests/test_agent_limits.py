"""The agent's POST /offer is bounded: in size (413, with or without a Content-Length), in
rate per client address (token bucket, 429 with Retry-After, on an injected clock: no
sleeps), and in calls at once (max_peers, 503: see tests/test_agent_app.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from agent.__main__ import build_parser, config_from_args
from agent.app import AgentServer, RateLimiter
from agent.config import AgentConfig, ConfigError, TTSConfig
from tests.agent_helpers import ManualClock
from tests.reliability import record

NOWHERE = "127.0.0.1:1"  # no TTS server listens there


# --------------------------------------------------------------------------- the bucket


def test_token_bucket() -> None:
    clock = ManualClock()
    rl = RateLimiter(rate_per_min=30, burst=10, clock=clock)
    assert [rl.take("a") for _ in range(10)] == [0.0] * 10  # the burst
    assert rl.take("a") == pytest.approx(2.0)  # 30 per minute: one every 2 s
    assert rl.take("b") == 0.0  # another address has its own bucket
    clock.advance(1.0)
    assert rl.take("a") == pytest.approx(1.0)  # refused calls take nothing
    clock.advance(1.0)
    assert rl.take("a") == 0.0 and rl.take("a") == pytest.approx(2.0)
    clock.advance(3600)
    assert [rl.take("a") for _ in range(11)][-2:] == [0.0, pytest.approx(2.0)]  # refilled to the burst only


def test_token_bucket_forgets_the_least_recent_clients() -> None:
    clock = ManualClock()
    rl = RateLimiter(rate_per_min=1, burst=1, clock=clock, max_keys=3)
    for key in "abc":
        assert rl.take(key) == 0.0
    assert rl.take("a") > 0  # a is now the most recent
    assert rl.take("d") == 0.0 and len(rl) == 3  # b went
    assert rl.take("b") == 0.0  # a forgotten client starts with a full bucket
    assert rl.take("a") > 0 and len(rl) == 3


def test_no_limit_when_the_rate_is_zero() -> None:
    rl = RateLimiter(rate_per_min=0, burst=0, clock=ManualClock())
    assert all(rl.take("a") == 0.0 for _ in range(1000)) and len(rl) == 0


# --------------------------------------------------------------------------- over HTTP


@pytest.fixture
async def limited() -> AsyncIterator[tuple[AgentServer, ManualClock]]:
    clock = ManualClock()
    config = AgentConfig(
        tts=TTSConfig(address=NOWHERE, speaker="vivian"),
        http_port=0,
        metrics_port=None,
        max_offer_bytes=4096,
        offer_rate_per_min=6,  # one every 10 s
        offer_burst=3,
    )
    server = AgentServer(config, clock=clock)
    await server.start()
    yield server, clock
    await server.stop()


async def _post(
    url: str, *, local: str | None = None, **kw: object
) -> tuple[int, dict[str, object], dict[str, str]]:
    connector = aiohttp.TCPConnector(local_addr=(local, 0) if local else None)
    async with aiohttp.ClientSession(connector=connector) as s, s.post(url + "/offer", **kw) as r:  # type: ignore[arg-type]
        return r.status, await r.json(content_type=None), dict(r.headers)


async def test_offers_are_rate_limited_per_address(limited: tuple[AgentServer, ManualClock]) -> None:
    server, clock = limited
    statuses = [(await _post(server.url, data=b"{nope"))[0] for _ in range(3)]
    assert statuses == [400, 400, 400]  # within the burst: the body is checked (and is bad)
    status, body, headers = await _post(server.url, data=b"{nope")
    assert status == 429 and headers["Retry-After"] == "10"
    assert "too many offers" in str(body["error"]) and "3 at once" in str(body["error"])
    # refused before the body is read: a large body is not even looked at
    status, _, _ = await _post(server.url, data=b"x" * 100_000)
    assert status == 429
    # another address is not affected (127.0.0.2 is loopback too)
    status, _, _ = await _post(server.url, local="127.0.0.2", data=b"{nope")
    assert status == 400
    clock.advance(4.0)
    status, _, headers = await _post(server.url, data=b"{nope")
    assert status == 429 and headers["Retry-After"] == "6"
    clock.advance(6.0)
    assert (await _post(server.url, data=b"{nope"))[0] == 400  # one token back
    assert (await _post(server.url, data=b"{nope"))[0] == 429
    record("security", "agent POST /offer rate limit", burst=3, rate_per_min=6, refused_status=429,
           retry_after_s=10)  # fmt: skip


async def test_offer_body_size_is_bounded(limited: tuple[AgentServer, ManualClock]) -> None:
    server, clock = limited
    status, body, _ = await _post(server.url, json={"sdp": "v=0" + "x" * 5000, "type": "offer"})
    assert status == 413 and "larger than 4096 bytes (max_offer_bytes)" in str(body["error"])

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it arrives
        for _ in range(10):
            yield b'{"sdp": "' + b"x" * 1000

    clock.advance(60)
    status, _, _ = await _post(server.url, data=chunks())
    assert status == 413
    clock.advance(60)
    status, body, _ = await _post(server.url, json={"sdp": "v=0\r\n" + "x" * 3000, "type": "offer"})
    assert status == 400 and "offer rejected" in str(body["error"])  # under the limit: parsed
    record("security", "agent POST /offer size limit", max_offer_bytes=4096, over_limit_status=413)


# --------------------------------------------------------------------------- settings


def test_limits_are_settings_with_defaults() -> None:
    d = AgentConfig()
    assert (d.offer_rate_per_min, d.offer_burst, d.max_peers, d.max_offer_bytes) == (30.0, 10, 8, 64 * 1024)
    c = config_from_args(
        build_parser().parse_args(
            [
                "--offer-rate-per-min",
                "12",
                "--offer-burst",
                "4",
                "--max-offer-bytes",
                "8192",
                "--max-peers",
                "2",
            ]
        )
    )
    assert (c.offer_rate_per_min, c.offer_burst, c.max_offer_bytes, c.max_peers) == (12.0, 4, 8192, 2)
    assert config_from_args(build_parser().parse_args(["--offer-rate-per-min", "0"])).offer_rate_per_min == 0
    for bad in (
        AgentConfig(offer_rate_per_min=-1),
        AgentConfig(offer_burst=0),
        AgentConfig(offer_rate_clients=0),
        AgentConfig(max_peers=0),
        AgentConfig(max_offer_bytes=100),
    ):
        with pytest.raises(ConfigError):
            bad.validated()
