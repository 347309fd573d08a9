"""Persistent stores of cloned voices, behind one interface (``VoiceStore``).

Two backends keep the same guarantees: atomic create, unguessable ids, list, delete, a
limit on the number of voices, and voices that survive a server restart.

* ``DirectoryVoiceStore`` (the default; ``VoiceStore(root, ...)`` opens one): files in a
  directory, for one server process.
* ``RedisVoiceStore`` (``qwen3tts_rt.server.voice_store_redis``; ``--voices redis://...``):
  one Redis database shared by every server (the replicas of a Ray Serve application),
  safe with several of them writing at once.

``open_voice_store(config, fingerprint)`` picks the backend from the server config.

The directory store: each voice is two files in the store directory, both written
atomically (temp file, fsync, rename, fsync of the directory):

* ``<id>.safetensors`` — the ``VoiceClonePrompt`` (speaker embedding, reference codes);
* ``<id>.json`` — its record (display name, creation time, ...). A voice exists exactly
  when its record does: the prompt is written first and removed last, so a crash leaves
  at worst an orphan prompt, which the next start deletes.

Ids are unguessable (``secrets.token_urlsafe``: 96 random bits) and are checked against a
strict pattern before any path (or key) is made from them, so no request can name a file
outside the directory; display names are data in the record, never part of a path.
A write that fails for lack of space (full disk, quota, file-size limit; Redis at its
``maxmemory``) raises ``StoreFullError`` (RESOURCE_EXHAUSTED: the server's problem, not the
request's) and leaves the store as it was: the half-written files are removed at once, and
no voice is recorded.
Prompts are computed once (at creation; a repeated identical request returns the voice
it made before) and kept in memory under a byte cap (least recently used dropped first).
Voices computed with other weights are kept but not listed or used.
Thread-safe: the server calls every method from its I/O worker threads.
"""

from __future__ import annotations

import abc
import collections
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen3tts_rt.engine.voices import VoiceClonePrompt
from qwen3tts_rt.errors import CapacityError, NotFoundError

if TYPE_CHECKING:
    from qwen3tts_rt.server.config import ServerConfig

log = logging.getLogger(__name__)

VOICE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
VOICE_ID_BYTES = 12  # 96 random bits -> 16 URL-safe characters
RECORD_FORMAT = "qwen3tts-rt.voice.v1"
# errors that mean "no room to write": full disk, quota, RLIMIT_FSIZE
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class StoreFullError(CapacityError):
    """The voice could not be saved: the store's disk (or quota) is full."""


@dataclass(frozen=True)
class VoiceRecord:
    voice_id: str
    display_name: str
    x_vector_only: bool
    ref_text: str
    ref_audio_seconds: float
    created_unix_ms: int
    model_fingerprint: str
    request_hash: str  # what it was made from (audio bytes, transcript, mode, name)
    notes: list[str] = field(default_factory=list)
    format: str = RECORD_FORMAT


def request_hash(ref_audio: bytes, ref_text: str, x_vector_only: bool, display_name: str) -> str:
    h = hashlib.sha256()
    for part in (ref_audio, ref_text.encode(), b"x" if x_vector_only else b"i", display_name.encode()):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def is_valid_voice_id(voice_id: str) -> bool:
    return bool(VOICE_ID_RE.fullmatch(voice_id))


def new_voice_id() -> str:
    """A fresh unguessable voice id (``VOICE_ID_BYTES`` random bytes, URL-safe base64)."""
    return secrets.token_urlsafe(VOICE_ID_BYTES)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc`` (libraries such as safetensors wrap it in their own)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    text = str(exc)
    for code in NO_SPACE_ERRNOS:  # a Rust-side I/O error arrives as text only
        if os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def record_from_json(data: Any) -> VoiceRecord:
    """A ``VoiceRecord`` from its JSON form (raises ValueError/TypeError when it is not one)."""
    if not isinstance(data, dict):
        raise ValueError("a voice record is a JSON object")
    if data.get("format") != RECORD_FORMAT:
        raise ValueError(f"unknown format {data.get('format')!r}")
    return VoiceRecord(**data)


def record_to_json(rec: VoiceRecord) -> bytes:
    return json.dumps(asdict(rec), indent=1).encode()


def capacity_error(max_voices: int) -> CapacityError:
    return CapacityError(
        f"the voice store holds its limit of {max_voices} voices (max_voices); delete some first"
    )


def not_found(voice_id: str) -> NotFoundError:
    return NotFoundError(f"voice '{voice_id[:80]}' not found")


class PromptLru:
    """Clone prompts kept in memory under a byte cap, least recently used dropped first.
    Not locked: its owner holds a lock around every call."""

    def __init__(self, cap_bytes: int) -> None:
        self.cap_bytes = cap_bytes
        self.nbytes = 0
        self._items: collections.OrderedDict[str, VoiceClonePrompt] = collections.OrderedDict()

    def get(self, voice_id: str) -> VoiceClonePrompt | None:
        prompt = self._items.get(voice_id)
        if prompt is not None:
            self._items.move_to_end(voice_id)
        return prompt

    def put(self, voice_id: str, prompt: VoiceClonePrompt) -> None:
        if voice_id in self._items:
            self._items.move_to_end(voice_id)
            return
        size = prompt.nbytes()
        if size > self.cap_bytes:
            return
        self._items[voice_id] = prompt
        self.nbytes += size
        while self.nbytes > self.cap_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes()

    def drop(self, voice_id: str) -> None:
        dropped = self._items.pop(voice_id, None)
        if dropped is not None:
            self.nbytes -= dropped.nbytes()


class VoiceStore(abc.ABC):
    """The interface of a voice store (module docstring). Every method is thread-safe.

    ``VoiceStore(root, fingerprint, max_voices=..., cache_bytes=...)`` opens the directory
    store, as it always has; ``open_voice_store`` picks a backend from the server config."""

    def __new__(cls, *args: Any, **kwargs: Any) -> VoiceStore:
        if cls is VoiceStore:  # the interface named directly: the default backend
            cls = DirectoryVoiceStore
        return super().__new__(cls)

    def __init__(self, model_fingerprint: str, *, max_voices: int, cache_bytes: int) -> None:
        if max_voices < 1:
            raise ValueError("max_voices must be >= 1")
        if cache_bytes < 0:
            raise ValueError("voice_cache_bytes must be >= 0")
        self.fingerprint = model_fingerprint
        self.max_voices = max_voices
        self.cache_bytes = cache_bytes

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the voices live (a directory, a Redis URL without its password), for logs."""

    @abc.abstractmethod
    def find_by_request(self, req_hash: str) -> VoiceRecord | None:
        """The voice an identical request made before (``request_hash``), if any."""

    @abc.abstractmethod
    def create(
        self,
        prompt: VoiceClonePrompt,
        *,
        display_name: str,
        ref_audio_seconds: float,
        req_hash: str,
        notes: list[str],
    ) -> VoiceRecord:
        """Save a voice under a fresh id, atomically (all of it or nothing). A voice made
        from the same request already returns that voice; ``CapacityError`` at
        ``max_voices``, ``StoreFullError`` when the backend has no room."""

    @abc.abstractmethod
    def get(self, voice_id: str) -> VoiceRecord:
        """The record of a voice (``NotFoundError`` if there is none)."""

    def has(self, voice_id: str) -> bool:
        try:
            self.get(voice_id)
        except NotFoundError:
            return False
        return True

    @abc.abstractmethod
    def list(self) -> list[VoiceRecord]:
        """Every voice of this model, oldest first."""

    @abc.abstractmethod
    def prompt(self, voice_id: str) -> VoiceClonePrompt:
        """The clone prompt of a voice (``NotFoundError`` if there is none)."""

    @abc.abstractmethod
    def delete(self, voice_id: str) -> None:
        """Remove a voice (``NotFoundError`` if there is none)."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @property
    @abc.abstractmethod
    def cached_bytes(self) -> int:
        """Bytes of clone prompts held in memory."""

    def close(self) -> None:
        """Release connections (nothing to do for a directory). Safe to call twice."""
        return None

    def _new_record(
        self,
        voice_id: str,
        prompt: VoiceClonePrompt,
        *,
        display_name: str,
        ref_audio_seconds: float,
        req_hash: str,
        notes: Sequence[str],
    ) -> VoiceRecord:
        return VoiceRecord(
            voice_id=voice_id,
            display_name=display_name,
            x_vector_only=prompt.x_vector_only,
            ref_text=prompt.ref_text or "",
            ref_audio_seconds=float(ref_audio_seconds),
            created_unix_ms=int(time.time() * 1000),
            model_fingerprint=self.fingerprint,
            request_hash=req_hash,
            notes=list(notes),
        )


class DirectoryVoiceStore(VoiceStore):
    """Voices as files in one directory (module docstring), for one server process."""

    def __init__(
        self, root: str | os.PathLike[str], model_fingerprint: str, *, max_voices: int, cache_bytes: int
    ):
        super().__init__(model_fingerprint, max_voices=max_voices, cache_bytes=cache_bytes)
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_resolved = self.root.resolve()
        self._lock = threading.Lock()
        self._records: dict[str, VoiceRecord] = {}
        self._by_request: dict[str, str] = {}
        self._cache = PromptLru(cache_bytes)
        self._load_records()

    @property
    def location(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------ paths

    def _path(self, voice_id: str, suffix: str) -> Path:
        if not is_valid_voice_id(voice_id):
            raise NotFoundError(f"voice '{voice_id[:80]}' not found (voice ids match {VOICE_ID_RE.pattern})")
        p = self.root / f"{voice_id}{suffix}"
        if p.resolve().parent != self._root_resolved:  # belt and braces: never leave the root
            raise NotFoundError(f"voice '{voice_id}' not found")
        return p

    # ------------------------------------------------------------------ start-up

    def _load_records(self) -> None:
        for tmp in self.root.glob(".tmp-*"):
            tmp.unlink(missing_ok=True)
        for rec_path in sorted(self.root.glob("*.json")):
            voice_id = rec_path.stem
            if not is_valid_voice_id(voice_id):
                continue
            try:
                rec = record_from_json(json.loads(rec_path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable voice record %s: %s", rec_path, e)
                continue
            if not (self.root / f"{voice_id}.safetensors").is_file():
                log.warning("voice %s has a record but no prompt file; ignoring it", voice_id)
                continue
            if rec.model_fingerprint != self.fingerprint:
                continue  # made with other weights: kept on disk, not served by this model
            self._records[voice_id] = rec
            self._by_request[rec.request_hash] = voice_id
        for prompt_path in self.root.glob("*.safetensors"):
            if not (self.root / f"{prompt_path.stem}.json").exists():
                log.warning("removing orphan voice prompt %s (no record)", prompt_path)
                prompt_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ API

    def find_by_request(self, req_hash: str) -> VoiceRecord | None:
        with self._lock:
            vid = self._by_request.get(req_hash)
            return self._records.get(vid) if vid else None

    def create(
        self,
        prompt: VoiceClonePrompt,
        *,
        display_name: str,
        ref_audio_seconds: float,
        req_hash: str,
        notes: list[str],
    ) -> VoiceRecord:
        with self._lock:
            existing = self._by_request.get(req_hash)
            if existing is not None:
                return self._records[existing]
            if len(self._records) >= self.max_voices:
                raise capacity_error(self.max_voices)
            voice_id = new_voice_id()
            while voice_id in self._records or not is_valid_voice_id(voice_id):
                voice_id = new_voice_id()
            rec = self._new_record(
                voice_id,
                prompt,
                display_name=display_name,
                ref_audio_seconds=ref_audio_seconds,
                req_hash=req_hash,
                notes=notes,
            )
            self._save(voice_id, prompt, rec)
            self._records[voice_id] = rec
            self._by_request[req_hash] = voice_id
            self._cache.put(voice_id, prompt)
            return rec

    def _save(self, voice_id: str, prompt: VoiceClonePrompt, rec: VoiceRecord) -> None:
        """Write the prompt, then the record (lock held). On failure nothing of the voice is
        left behind: ``_atomic_write`` removes its temp file, and a prompt already in place
        are removed here (a prompt would otherwise wait for the next start as an orphan)."""
        prompt_path, record_path = self._path(voice_id, ".safetensors"), self._path(voice_id, ".json")
        body = record_to_json(rec)
        try:
            _atomic_write(prompt_path, prompt.save)
            _atomic_write(record_path, lambda p: p.write_bytes(body))
        except BaseException as e:
            record_path.unlink(missing_ok=True)  # a fresh id: nothing else has these names
            prompt_path.unlink(missing_ok=True)
            err = _os_error(e)
            if err is not None and err.errno in NO_SPACE_ERRNOS:
                log.error("voice store %s: cannot save voice %s: %s", self.root, voice_id, err)
                raise StoreFullError(
                    f"the server's voice store is out of space ({os.strerror(err.errno or 0)}); "
                    "the voice was not saved and the store is unchanged: retry later or ask the "
                    "operator to free disk space"
                ) from e
            raise

    def get(self, voice_id: str) -> VoiceRecord:
        with self._lock:
            rec = self._records.get(voice_id)
        if rec is None:
            raise not_found(voice_id)
        return rec

    def has(self, voice_id: str) -> bool:
        with self._lock:
            return voice_id in self._records

    def list(self) -> list[VoiceRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: (r.created_unix_ms, r.voice_id))

    def prompt(self, voice_id: str) -> VoiceClonePrompt:
        """The clone prompt of a voice (from memory, or read from disk once)."""
        with self._lock:
            if voice_id not in self._records:
                raise not_found(voice_id)
            cached = self._cache.get(voice_id)
            if cached is not None:
                return cached
            path = self._path(voice_id, ".safetensors")
        prompt = VoiceClonePrompt.load(path)  # outside the lock: disk I/O
        with self._lock:
            if voice_id in self._records:
                self._cache.put(voice_id, prompt)
        return prompt

    def delete(self, voice_id: str) -> None:
        with self._lock:
            rec = self._records.pop(voice_id, None)
            if rec is None:
                raise not_found(voice_id)
            self._by_request.pop(rec.request_hash, None)
            self._cache.drop(voice_id)
            self._path(voice_id, ".json").unlink(missing_ok=True)  # the record first: gone from now on
            _fsync_dir(self.root)
            self._path(voice_id, ".safetensors").unlink(missing_ok=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cache.nbytes


def open_voice_store(config: ServerConfig, model_fingerprint: str) -> VoiceStore:
    """The voice store the server config names: ``voices_url`` (``redis://``,
    ``rediss://``, ``unix://``) for the shared Redis store, else the directory
    ``voices_dir``."""
    if config.voices_url:
        from qwen3tts_rt.server.voice_store_redis import RedisVoiceStore

        return RedisVoiceStore(
            config.voices_url,
            model_fingerprint,
            max_voices=config.max_voices,
            cache_bytes=config.voice_cache_bytes,
            key_prefix=config.redis_key_prefix,
            timeout_s=config.redis_timeout_s,
            max_connections=config.redis_max_connections,
        )
    return DirectoryVoiceStore(
        config.voices_dir,
        model_fingerprint,
        max_voices=config.max_voices,
        cache_bytes=config.voice_cache_bytes,
    )
