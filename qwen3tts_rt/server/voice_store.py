"""A persistent store of cloned voices.

Each voice is two files in the store directory, both written atomically (temp file,
fsync, rename, fsync of the directory):

* ``<id>.safetensors`` — the ``VoiceClonePrompt`` (speaker embedding, reference codes);
* ``<id>.json`` — its record (display name, creation time, ...). A voice exists exactly
  when its record does: the prompt is written first and removed last, so a crash leaves
  at worst an orphan prompt, which the next start deletes.

Ids are unguessable (``secrets.token_urlsafe``: 96 random bits) and are checked against a
strict pattern before any path is made from them, so no request can name a file outside
the directory; display names are data in the record, never part of a path.
A write that fails for lack of space (full disk, quota, file-size limit) raises
``StoreFullError`` (RESOURCE_EXHAUSTED: the server's problem, not the request's) and leaves
the store as it was: the half-written files are removed at once, and no voice is recorded.
Prompts are computed once (at creation; a repeated identical request returns the voice
it made before) and kept in memory under a byte cap (least recently used dropped first).
Voices computed with other weights are kept on disk but not listed or used.
Thread-safe: the gRPC layer calls it from worker threads.
"""

from __future__ import annotations

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qwen3tts_rt.engine.voices import VoiceClonePrompt
from qwen3tts_rt.errors import CapacityError, NotFoundError

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


class VoiceStore:
    def __init__(
        self, root: str | os.PathLike[str], model_fingerprint: str, *, max_voices: int, cache_bytes: int
    ):
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self._root_resolved = self.root.resolve()
        self.fingerprint = model_fingerprint
        self.max_voices = max_voices
        self.cache_bytes = cache_bytes
        self._lock = threading.Lock()
        self._records: dict[str, VoiceRecord] = {}
        self._by_request: dict[str, str] = {}
        self._cache: collections.OrderedDict[str, VoiceClonePrompt] = collections.OrderedDict()
        self._cached_bytes = 0
        self._load_records()

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
                data = json.loads(rec_path.read_text(encoding="utf-8"))
                if data.get("format") != RECORD_FORMAT:
                    raise ValueError(f"unknown format {data.get('format')!r}")
                rec = VoiceRecord(**data)
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
                raise CapacityError(
                    f"the voice store holds its limit of {self.max_voices} voices (max_voices); delete some first"
                )
            voice_id = new_voice_id()
            while voice_id in self._records or not is_valid_voice_id(voice_id):
                voice_id = new_voice_id()
            rec = VoiceRecord(
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
            self._save(voice_id, prompt, rec)
            self._records[voice_id] = rec
            self._by_request[req_hash] = voice_id
            self._remember(voice_id, prompt)
            return rec

    def _save(self, voice_id: str, prompt: VoiceClonePrompt, rec: VoiceRecord) -> None:
        """Write the prompt, then the record (lock held). On failure nothing of the voice is
        left behind: ``_atomic_write`` removes its temp file, and a prompt already in place
        are removed here (a prompt would otherwise wait for the next start as an orphan)."""
        prompt_path, record_path = self._path(voice_id, ".safetensors"), self._path(voice_id, ".json")
        body = json.dumps(asdict(rec), indent=1).encode()
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
            raise NotFoundError(f"voice '{voice_id[:80]}' not found")
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
                raise NotFoundError(f"voice '{voice_id[:80]}' not found")
            cached = self._cache.get(voice_id)
            if cached is not None:
                self._cache.move_to_end(voice_id)
                return cached
            path = self._path(voice_id, ".safetensors")
        prompt = VoiceClonePrompt.load(path)  # outside the lock: disk I/O
        with self._lock:
            if voice_id in self._records:
                self._remember(voice_id, prompt)
        return prompt

    def delete(self, voice_id: str) -> None:
        with self._lock:
            rec = self._records.pop(voice_id, None)
            if rec is None:
                raise NotFoundError(f"voice '{voice_id[:80]}' not found")
            self._by_request.pop(rec.request_hash, None)
            dropped = self._cache.pop(voice_id, None)
            if dropped is not None:
                self._cached_bytes -= dropped.nbytes()
            self._path(voice_id, ".json").unlink(missing_ok=True)  # the record first: gone from now on
            _fsync_dir(self.root)
            self._path(voice_id, ".safetensors").unlink(missing_ok=True)

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._cached_bytes

    # ------------------------------------------------------------------ cache (lock held)

    def _remember(self, voice_id: str, prompt: VoiceClonePrompt) -> None:
        if voice_id in self._cache:
            self._cache.move_to_end(voice_id)
            return
        size = prompt.nbytes()
        if size > self.cache_bytes:
            return
        self._cache[voice_id] = prompt
        self._cached_bytes += size
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.nbytes()
