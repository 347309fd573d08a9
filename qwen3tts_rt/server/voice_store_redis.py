"""The voice store in Redis: one database shared by every server that names it (the
replicas of a Ray Serve application, or several ``qwen3tts-rt serve`` processes).

Same guarantees as the directory store (``voice_store``): atomic create, unguessable
ids, list, delete, ``max_voices``, voices outlive any server. Every write is one Lua
script, which Redis runs atomically, so servers writing at once never see half a voice,
never exceed ``max_voices`` together, and two identical requests made at once on two
servers yield one voice (the second server's script finds the first one's).

Keys (``P`` = ``redis_key_prefix``, ``F`` = the model fingerprint; the braces make
``{F}`` a Redis Cluster hash tag, so one model's keys share a slot):

* ``P{F}:v:<id>``   hash: ``record`` (the JSON record), ``prompt`` (the clone prompt as
  a ``.safetensors`` file), ``req`` (the request hash it was made from);
* ``P{F}:req:<hash>``  the id of the voice that request made;
* ``P{F}:ids``       sorted set of ids by creation time (list order, and the count).

Voices of other weights live under another ``{F}``: kept, not listed or used. A voice id
is checked against ``VOICE_ID_RE`` before any key is made from it.

Errors: Redis unreachable (connection refused, timeout, a read-only replica) ->
``UnavailableError`` (UNAVAILABLE: retry); Redis at its ``maxmemory`` -> ``StoreFullError``
(RESOURCE_EXHAUSTED), and the script wrote nothing (its first write is refused, so nothing
follows it). What Redis persistence (RDB/AOF) does and does not promise: docs/DEPLOY.md.

Prompts are cached in memory under ``cache_bytes``, as in the directory store; every use
first asks Redis whether the voice still exists (one round trip), so a voice deleted
through one server is gone on all of them at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qwen3tts_rt.engine.voices import VoiceClonePrompt
from qwen3tts_rt.errors import UnavailableError
from qwen3tts_rt.server.voice_store import (
    PromptLru,
    StoreFullError,
    VoiceRecord,
    VoiceStore,
    capacity_error,
    is_valid_voice_id,
    new_voice_id,
    not_found,
    record_from_json,
    record_to_json,
)

log = logging.getLogger(__name__)

SCHEMES = ("redis", "rediss", "unix")
KEY_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:/-]{0,64}$")
FINGERPRINT_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
REDIS_RETRIES = 2  # retries of a command after a connection error (create and delete are idempotent)

# KEYS: voice, req, ids. ARGV: id, record, prompt, req hash, max voices, created ms.
# Returns {"existing", id} | {"full"} | {"taken"} | {"created", id}. The first write (HSET)
# comes after every check: refused at maxmemory, it leaves nothing behind.
_CREATE = """
local existing = redis.call('GET', KEYS[2])
if existing then return {'existing', existing} end
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[5]) then return {'full'} end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'taken'} end
redis.call('HSET', KEYS[1], 'record', ARGV[2], 'prompt', ARGV[3], 'req', ARGV[4])
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[1])
return {'created', ARGV[1]}
"""

# KEYS: voice, ids, req. ARGV: id. Returns 1 if deleted, 0 if there was no voice.
_DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return 1
"""


def check_redis_settings(url: str, key_prefix: str, timeout_s: float, max_connections: int) -> None:
    """Raise ValueError naming the setting when a Redis store setting is unusable."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(
            f"voices_url must be redis://host:port/db, rediss://host:port/db or unix:///path?db=N "
            f"(got a {scheme or 'scheme-less'} URL)"
        )
    if not KEY_PREFIX_RE.fullmatch(key_prefix):
        raise ValueError("redis_key_prefix may hold at most 64 letters, digits and _ . : / -")
    if not 0 < timeout_s <= 300:
        raise ValueError("redis_timeout_s must be in (0, 300] seconds")
    if max_connections < 1:
        raise ValueError("redis_max_connections must be >= 1")


def redacted(url: str) -> str:
    """The URL without its password (for logs and error messages)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def fingerprint_tag(fingerprint: str) -> str:
    if FINGERPRINT_TAG_RE.fullmatch(fingerprint):
        return fingerprint
    return hashlib.sha256(fingerprint.encode()).hexdigest()[:32]


def _text(value: Any) -> str:
    """A Redis reply (bytes: the client does not decode) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def prompt_to_bytes(prompt: VoiceClonePrompt) -> bytes:
    """The prompt's ``.safetensors`` file, as bytes (the format of ``VoiceClonePrompt.save``)."""
    with tempfile.TemporaryDirectory(prefix="qwen3tts-voice-") as d:
        path = Path(d) / "prompt.safetensors"
        prompt.save(path)
        return path.read_bytes()


def prompt_from_bytes(data: bytes) -> VoiceClonePrompt:
    with tempfile.TemporaryDirectory(prefix="qwen3tts-voice-") as d:
        path = Path(d) / "prompt.safetensors"
        path.write_bytes(data)
        return VoiceClonePrompt.load(path)


class RedisVoiceStore(VoiceStore):
    """Voices in one Redis database (module docstring). Thread-safe: redis-py's
    connection pool hands each calling thread its own connection."""

    def __init__(
        self,
        url: str,
        model_fingerprint: str,
        *,
        max_voices: int,
        cache_bytes: int,
        key_prefix: str = "qwen3tts:",
        timeout_s: float = 5.0,
        max_connections: int = 32,
    ) -> None:
        super().__init__(model_fingerprint, max_voices=max_voices, cache_bytes=cache_bytes)
        check_redis_settings(url, key_prefix, timeout_s, max_connections)
        try:
            import redis
            from redis.backoff import ExponentialBackoff
            from redis.retry import Retry
        except ImportError as e:  # pragma: no cover - depends on the install
            raise UnavailableError(
                "a redis:// voice store needs the redis client: pip install 'qwen3tts-rt[ray]' (or redis)"
            ) from e
        self._redis_errors = redis.exceptions
        self.url = url
        self._ns = f"{key_prefix}{{{fingerprint_tag(model_fingerprint)}}}:"
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_s,  # waiting for a free connection of the pool
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), REDIS_RETRIES),
            health_check_interval=30,
        )
        self._r = redis.Redis(connection_pool=pool)
        self._create = self._r.register_script(_CREATE)
        self._delete = self._r.register_script(_DELETE)
        self._lock = threading.Lock()  # the prompt cache only: Redis holds everything else
        self._cache = PromptLru(cache_bytes)
        self._closed = False
        with self._errors("connect"):
            self._r.ping()
        log.info("voice store: %s (keys %s*), %d voices", self.location, self._ns, len(self))

    # ------------------------------------------------------------------ keys and errors

    @property
    def location(self) -> str:
        return redacted(self.url)

    def _voice_key(self, voice_id: str) -> str:
        return f"{self._ns}v:{voice_id}"

    def _req_key(self, req_hash: str) -> str:
        return f"{self._ns}req:{req_hash}"

    @property
    def _ids_key(self) -> str:
        return f"{self._ns}ids"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Redis failures as the server's error kinds (module docstring)."""
        exc = self._redis_errors
        try:
            yield
        except (exc.ConnectionError, exc.TimeoutError, exc.ReadOnlyError) as e:
            log.error("voice store %s: %s failed: %s", self.location, what, e)
            raise UnavailableError(
                f"the voice store (Redis at {self.location}) is unreachable or read-only "
                f"({type(e).__name__}); retry shortly"
            ) from e
        except exc.ResponseError as e:
            if isinstance(e, getattr(exc, "OutOfMemoryError", ())) or str(e).startswith("OOM"):
                log.error("voice store %s: %s refused: %s", self.location, what, e)
                raise StoreFullError(
                    "the server's voice store is out of memory (Redis maxmemory); the voice was not "
                    "saved and the store is unchanged: retry later or ask the operator to make room"
                ) from e
            raise

    # ------------------------------------------------------------------ API

    def _record(self, raw: Any, voice_id: str) -> VoiceRecord | None:
        if raw is None:
            return None
        try:
            return record_from_json(json.loads(raw))
        except (ValueError, TypeError) as e:
            log.warning("voice store %s: ignoring unreadable record of %s: %s", self.location, voice_id, e)
            return None

    def find_by_request(self, req_hash: str) -> VoiceRecord | None:
        with self._errors("find_by_request"):
            vid = self._r.get(self._req_key(req_hash))
            if vid is None:
                return None
            voice_id = _text(vid)
            return self._record(self._r.hget(self._voice_key(voice_id), "record"), voice_id)

    def create(
        self,
        prompt: VoiceClonePrompt,
        *,
        display_name: str,
        ref_audio_seconds: float,
        req_hash: str,
        notes: list[str],
    ) -> VoiceRecord:
        body = prompt_to_bytes(prompt)
        for _ in range(8):  # a fresh id is taken with probability ~ voices / 2**96
            voice_id = new_voice_id()
            if not is_valid_voice_id(voice_id):
                continue
            rec = self._new_record(
                voice_id,
                prompt,
                display_name=display_name,
                ref_audio_seconds=ref_audio_seconds,
                req_hash=req_hash,
                notes=notes,
            )
            with self._errors("create"):
                res = self._create(
                    keys=[self._voice_key(voice_id), self._req_key(req_hash), self._ids_key],
                    args=[
                        voice_id,
                        record_to_json(rec),
                        body,
                        req_hash,
                        self.max_voices,
                        rec.created_unix_ms,
                    ],
                )
            status = _text(res[0])
            if status == "created":
                with self._lock:
                    self._cache.put(voice_id, prompt)
                return rec
            if status == "existing":  # made from the same request (here or on another server)
                existing = _text(res[1])
                return self.get(existing)
            if status == "full":
                raise capacity_error(self.max_voices)
        raise RuntimeError("could not find a free voice id")  # pragma: no cover

    def get(self, voice_id: str) -> VoiceRecord:
        if not is_valid_voice_id(voice_id):
            raise not_found(voice_id)
        with self._errors("get"):
            rec = self._record(self._r.hget(self._voice_key(voice_id), "record"), voice_id)
        if rec is None:
            raise not_found(voice_id)
        return rec

    def has(self, voice_id: str) -> bool:
        if not is_valid_voice_id(voice_id):
            return False
        with self._errors("has"):
            return bool(self._r.exists(self._voice_key(voice_id)))

    def list(self) -> list[VoiceRecord]:
        with self._errors("list"):
            ids = [_text(v) for v in self._r.zrange(self._ids_key, 0, -1)]
            pipe = self._r.pipeline(transaction=False)
            for vid in ids:
                pipe.hget(self._voice_key(vid), "record")
            raws = pipe.execute() if ids else []
        recs = [self._record(raw, vid) for vid, raw in zip(ids, raws)]
        return sorted((r for r in recs if r is not None), key=lambda r: (r.created_unix_ms, r.voice_id))

    def prompt(self, voice_id: str) -> VoiceClonePrompt:
        if not is_valid_voice_id(voice_id):
            raise not_found(voice_id)
        key = self._voice_key(voice_id)
        with self._lock:
            cached = self._cache.get(voice_id)
        if cached is not None:
            with self._errors("prompt"):
                alive = self._r.exists(key)
            if alive:
                return cached
            with self._lock:  # deleted through another server
                self._cache.drop(voice_id)
            raise not_found(voice_id)
        with self._errors("prompt"):
            data = self._r.hget(key, "prompt")
        if data is None:
            raise not_found(voice_id)
        prompt = prompt_from_bytes(data if isinstance(data, bytes) else data.encode())
        with self._lock:
            self._cache.put(voice_id, prompt)
        return prompt

    def delete(self, voice_id: str) -> None:
        if not is_valid_voice_id(voice_id):
            raise not_found(voice_id)
        key = self._voice_key(voice_id)
        with self._errors("delete"):
            req = self._r.hget(key, "req")
            deleted = req is not None and self._delete(
                keys=[key, self._ids_key, self._req_key(_text(req))], args=[voice_id]
            )
        with self._lock:
            self._cache.drop(voice_id)
        if not deleted:
            raise not_found(voice_id)

    def __len__(self) -> int:
        with self._errors("count"):
            return int(self._r.zcard(self._ids_key))

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cache.nbytes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._r.close()
        self._r.connection_pool.disconnect()
