"""Reference audio downloaded from a URL (``ref_audio_url``), for servers that allow it.

Off by default (``ServerConfig.allow_ref_audio_urls``). When on, a download is held to
the same byte limit as reference audio sent inline and to a time limit:

* http and https only (no ``file:``, ``ftp:``, ``data:``, ...), no credentials in the URL;
* host names are resolved here and every address is checked before connecting: loopback,
  private, link-local, multicast and reserved addresses are refused unless
  ``ref_audio_url_allow_private`` (the address connected to is the one checked, so a DNS
  answer that changes between check and connect cannot slip through);
* ``Content-Length`` is checked before the body is read, and the body is counted while it
  streams in (a server that lies about its length or sends none is cut off at the limit);
* one deadline covers connecting, each redirect and the whole body (a server trickling a
  byte a second is cut off too); DNS resolution is bounded by the system resolver;
* redirects are followed at most ``max_redirects`` times, each target checked like the
  first URL (scheme, credentials, addresses).

Every refusal is an ``InvalidInputError`` naming ``ref_audio_url`` (a too-large body is the
usual ``AudioTooLargeError``), so the client is told which rule it broke. ``fetch`` blocks:
the runtime calls it from a worker thread, never on the asyncio loop.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

from qwen3tts_rt.errors import AudioTooLargeError, CapacityError, InvalidInputError

log = logging.getLogger(__name__)

FIELD = "ref_audio_url"
ALLOWED_SCHEMES = ("http", "https")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
MAX_URL_CHARS = 4096
READ_CHUNK = 64 * 1024
USER_AGENT = "qwen3tts-rt (reference audio fetch)"


class RefAudioUrlError(InvalidInputError):
    """A reference-audio URL broke a rule, or its download failed."""

    def __init__(self, message: str, *, field: str | None = FIELD) -> None:
        super().__init__(message, field=field)


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int  # the reference-audio byte limit (ReferenceAudioRules.max_bytes)
    timeout_s: float = 10.0  # connect + redirects + whole body
    max_redirects: int = 3
    allow_private: bool = False  # loopback, private, link-local, ... addresses
    max_concurrent: int = 4  # downloads at once; more get RESOURCE_EXHAUSTED


def _host_label(url: str) -> str:
    """What a message may show of a URL: scheme and host, never the path or query."""
    p = urllib.parse.urlsplit(url)
    return f"{p.scheme}://{p.hostname or '?'}"


def check_url(url: str) -> urllib.parse.SplitResult:
    """The parsed URL, or ``RefAudioUrlError`` when it is not an acceptable http(s) URL."""
    if len(url) > MAX_URL_CHARS:
        raise RefAudioUrlError(f"is {len(url)} characters long; at most {MAX_URL_CHARS}")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise RefAudioUrlError("must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RefAudioUrlError(f"is not a valid URL ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        shown = f"'{scheme}:'" if scheme else "no scheme"
        raise RefAudioUrlError(f"has {shown}; only http:// and https:// URLs are fetched")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise RefAudioUrlError("must not contain credentials (user:password@); use a pre-signed URL instead")
    if not parts.hostname:
        raise RefAudioUrlError("has no host")
    if port == 0:
        raise RefAudioUrlError("has port 0")
    return parts


def _address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


class RefAudioFetcher:
    """Downloads reference audio under ``FetchLimits``. Thread-safe; ``fetch`` blocks."""

    def __init__(self, limits: FetchLimits) -> None:
        self.limits = limits
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)

    # ------------------------------------------------------------------ public

    def fetch(self, url: str) -> bytes:
        """The body of ``url`` (following redirects), within the limits."""
        check_url(url)
        if not self._slots.acquire(blocking=False):
            raise CapacityError(
                f"{self.limits.max_concurrent} reference-audio downloads are in progress "
                f"(ref_audio_url_max_concurrent); retry shortly or send the audio in ref_audio"
            )
        try:
            deadline = time.monotonic() + self.limits.timeout_s
            return self._follow(url, deadline)
        finally:
            self._slots.release()

    # ------------------------------------------------------------------ internals

    def _remaining(self, deadline: float, url: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RefAudioUrlError(
                f"downloading from {_host_label(url)} took longer than {self.limits.timeout_s:g} s "
                f"(ref_audio_url_timeout_s)"
            )
        return left

    def _follow(self, url: str, deadline: float) -> bytes:
        current = url
        for _ in range(self.limits.max_redirects + 1):
            status, location, body = self._get(current, deadline)
            if status in REDIRECT_STATUSES:
                if not location:
                    raise RefAudioUrlError(
                        f"{_host_label(current)} answered HTTP {status} without a Location"
                    )
                target = urllib.parse.urljoin(current, location)
                try:
                    check_url(target)
                except RefAudioUrlError as e:
                    raise RefAudioUrlError(f"redirects to a URL that is refused: {e.args[0]}") from None
                log.info(
                    "reference audio: %s redirects (%d) to %s",
                    _host_label(current),
                    status,
                    _host_label(target),
                )
                current = target
                continue
            assert body is not None
            return body
        raise RefAudioUrlError(
            f"redirected more than {self.limits.max_redirects} times (ref_audio_url_max_redirects)"
        )

    def _connect(self, host: str, port: int, deadline: float, url: str) -> socket.socket:
        """A socket to ``host:port``, connected only to an address that passes the rules."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as e:
            raise RefAudioUrlError(f"host {host!r} cannot be resolved ({e})") from None
        last: OSError | None = None
        refused: list[str] = []
        for family, kind, proto, _, sockaddr in infos:
            ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
            if not self.limits.allow_private and not _address_allowed(ip):
                refused.append(str(ip))
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(self._remaining(deadline, url))
                sock.connect(sockaddr)
                return sock
            except RefAudioUrlError:
                sock.close()
                raise
            except OSError as e:
                sock.close()
                last = e
        if refused and last is None:
            raise RefAudioUrlError(
                f"host {host!r} resolves to a non-public address ({', '.join(sorted(set(refused)))}); "
                f"such addresses are refused (ref_audio_url_allow_private)"
            )
        if isinstance(last, TimeoutError):
            self._remaining(deadline, url)
        raise RefAudioUrlError(f"cannot connect to {_host_label(url)} ({last})")

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes | None]:
        """(status, Location, body) of one GET; the body only for a 200."""
        parts = check_url(url)
        https = parts.scheme.lower() == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        timeout = self._remaining(deadline, url)
        conn: http.client.HTTPConnection
        if https:
            conn = http.client.HTTPSConnection(host, port, timeout=timeout)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        conn._create_connection = lambda address, *_a, **_k: self._connect(host, port, deadline, url)  # type: ignore[attr-defined]
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        try:
            conn.request(
                "GET",
                path,
                headers={"User-Agent": USER_AGENT, "Accept": "audio/*, */*", "Accept-Encoding": "identity"},
            )
            sock = conn.sock  # kept: the response may own the connection from here on
            resp = conn.getresponse()
            if resp.status in REDIRECT_STATUSES:
                return resp.status, resp.getheader("Location"), None
            if resp.status != 200:
                reason = f" {resp.reason}" if resp.reason else ""
                raise RefAudioUrlError(
                    f"{_host_label(url)} answered HTTP {resp.status}{reason}; expected 200 with the audio file"
                )
            return 200, None, self._read_body(resp, sock, deadline, url)
        except (RefAudioUrlError, AudioTooLargeError):
            raise
        except TimeoutError:
            self._remaining(deadline, url)  # raises once the deadline has passed
            raise RefAudioUrlError(f"{_host_label(url)} stopped answering") from None
        except (OSError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and time.monotonic() >= deadline:
                self._remaining(deadline, url)
            raise RefAudioUrlError(
                f"downloading from {_host_label(url)} failed ({type(e).__name__}: {e})"
            ) from None
        finally:
            conn.close()

    def _too_large(self, n: int, *, announced: bool) -> AudioTooLargeError:
        limit = self.limits.max_bytes
        what = f"announces {n} bytes" if announced else f"sent more than {limit} bytes"
        return AudioTooLargeError(
            f"the download {what}; reference audio may be at most {limit / 2**20:g} MiB ({limit} bytes)",
            field=FIELD,
        )

    def _read_body(
        self, resp: http.client.HTTPResponse, sock: socket.socket | None, deadline: float, url: str
    ) -> bytes:
        limit = self.limits.max_bytes
        length = resp.getheader("Content-Length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                raise RefAudioUrlError(
                    f"{_host_label(url)} sent a bad Content-Length {length[:40]!r}"
                ) from None
            if announced > limit:
                raise self._too_large(announced, announced=True)
        buf = bytearray()
        while True:
            left = self._remaining(deadline, url)
            if sock is not None:
                sock.settimeout(left)  # each read waits at most until the deadline
            chunk = resp.read1(min(READ_CHUNK, limit + 1 - len(buf)))
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                raise self._too_large(len(buf), announced=False)
        if not buf:
            raise RefAudioUrlError(f"{_host_label(url)} sent an empty body; expected an audio file")
        return bytes(buf)
