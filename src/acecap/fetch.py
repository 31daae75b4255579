"""Where a request's audio comes from: inline base64, a data: URL, a file inside the folder the server
allows, or an http(s) URL the server fetches.

Files and URLs are read within a deadline and a size cap. A URL's host is resolved once, every address it
resolves to is checked (private, loopback, link-local, multicast and reserved ones are refused unless the
server allows them), and the connection goes to the address that was checked, so DNS cannot answer
differently between the check and the fetch. Redirects are checked the same way. Errors name a generic
reason, never the URL (it may hold credentials) or what answered.
"""

from __future__ import annotations

import base64
import binascii
import functools
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urljoin, urlsplit

from .audio import PARTIAL_HINT, AudioError, Clip, decode_audio
from .chat import APIError

log = logging.getLogger("acecap")
MAX_REDIRECTS = 5
REDIRECTS = {301, 302, 303, 307, 308}
CHUNK = 1 << 16
LINE_BREAKS = dict.fromkeys(map(ord, "\r\n"))  # dropped from base64 before strict decoding
UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # spaces and control characters, which a URL must percent-encode


@dataclass(frozen=True)
class AudioAccess:
    """Where audio may come from besides the request itself, and the limits on reading it."""

    files: Path | None = None  # file:// URLs inside this folder (symlinks resolved) may be read
    urls: bool = False  # http(s) URLs may be fetched, from public addresses
    private_networks: tuple[str, ...] = ()  # … and from these non-public ones (CIDR; "0.0.0.0/0", "::/0": any)
    max_bytes: int = 100 * 2**20  # the most a file or URL may hold
    timeout_s: float = 60.0  # to read a file or URL, from the request's turn on the fetch workers
    _networks: tuple = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.timeout_s <= 0:
            raise ValueError("--max-fetch-mb and --fetch-timeout must be above 0")
        if self.files is not None:
            object.__setattr__(self, "files", Path(self.files).resolve())
        try:
            networks = tuple(ipaddress.ip_network(n, strict=False) for n in self.private_networks)
        except ValueError as error:
            raise ValueError(f"--allow-private-urls: {error}") from None
        object.__setattr__(self, "_networks", networks)

    def may_fetch(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True for a public address, or one inside the networks allowed besides."""
        plain = getattr(address, "ipv4_mapped", None) or address
        return is_public(address) or any(plain in network for network in self._networks)


def _scheme(url: str) -> str:
    """The URL's scheme, read from its first characters only: a data: URL may be 100 MB long."""
    head, colon, _ = url[:16].partition(":")
    return head.lower() if colon else ""


def reaches_out(source: tuple[str, str]) -> bool:
    """True when the audio must be read from a file or the network (not carried in the request)."""
    kind, value = source
    return kind == "url" and _scheme(value) in ("file", "http", "https")


def fetch_audio(source: tuple[str, str], access: AudioAccess, deadline: float | None = None,
                max_seconds: float | None = None) -> Clip:  # fmt: skip
    """The request's audio as a clip (blocking: reads, downloads and decodes). Files and URLs are read by
    `deadline` (time.monotonic(); default: `access.timeout_s` from now). At most `max_seconds` are decoded;
    the clip's duration is still the whole audio's, from its header."""
    kind, value = source
    _decoded = functools.partial(_decode, max_seconds=max_seconds)
    deadline = deadline if deadline is not None else time.monotonic() + access.timeout_s
    if kind == "data":
        return _decoded(_base64(value, "input_audio.data"), "input_audio")
    scheme = _scheme(value)
    if scheme == "data":
        header, _, payload = value.partition(",")
        if not header.lower().endswith(";base64"):
            raise APIError(400, "a data: audio_url must be base64 (data:audio/...;base64,...)")
        return _decoded(_base64(payload, "the audio_url's data"), "audio_url")
    if scheme == "file":
        path = _allowed_file(value, access)
        return _decoded(_read_file(path, access, deadline), str(path))
    if scheme in ("http", "https"):
        return _decoded(_download(value, access, deadline), "audio_url")
    raise APIError(400, f"audio_url scheme {scheme!r} is not supported: use data:, file:// or http(s)://")


def _decode(data: bytes, source: str, max_seconds: float | None) -> Clip:
    """The client's bytes decoded; whatever a decoder raises on them is the bytes' fault, answered with 400."""
    try:
        return decode_audio(data, source, max_seconds)
    except AudioError as error:
        raise APIError(400, f"the audio could not be used: {str(error).removesuffix(PARTIAL_HINT)}") from None
    except Exception as error:  # a decoder library's own failure on malformed data
        log.warning("decoding a request's audio failed", exc_info=error)
        raise APIError(400, f"the audio could not be decoded ({type(error).__name__})") from None


def _base64(text: str, what: str) -> bytes:
    try:  # line breaks allowed, as MIME's base64 (Python's encodebytes) writes them; nothing else
        return base64.b64decode(text.translate(LINE_BREAKS), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what} is not valid base64") from None


def _check_url_text(url: str) -> None:
    if UNSAFE.search(url):
        raise APIError(400, "audio_url holds a space or a control character: percent-encode it", param="messages")


def _shown(path: Path) -> str:
    """A client's path quoted in an error, cut short."""
    text = str(path)
    return text if len(text) <= 200 else text[:199] + "…"


def too_slow(access: AudioAccess) -> APIError:
    """The answer to a file or URL not read within --fetch-timeout."""
    return APIError(504, f"reading the audio_url took longer than the server's {access.timeout_s:g} s "
                    "(--fetch-timeout)", kind="timeout_error")  # fmt: skip


def _too_big(access: AudioAccess) -> APIError:
    return APIError(413, f"the audio_url's file is over the server's limit of {access.max_bytes / 2**20:g} MiB "
                    "(--max-fetch-mb)")  # fmt: skip


def _allowed_file(url: str, access: AudioAccess) -> Path:
    if access.files is None:
        raise APIError(403, "local files are off on this server (start it with --allow-files DIR)",
                       kind="permission_error")  # fmt: skip
    _check_url_text(url)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise APIError(400, "a file:// URL names a path on this server: file:///absolute/path")
    path = Path(unquote(parts.path))
    if "\0" in str(path):
        raise APIError(400, "the file path holds a NUL character")
    try:
        resolved = path.resolve()  # `..` and symlinks resolved before the check, so neither escapes the folder
    except (OSError, RuntimeError):  # a symlink loop, a name too long
        raise APIError(400, f"{_shown(path)} cannot be resolved (a symlink loop or a name too long)") from None
    if not path.is_absolute() or not resolved.is_relative_to(access.files):
        raise APIError(403, f"{_shown(path)} is outside the folder this server may read", kind="permission_error")
    return resolved


def _read_file(path: Path, access: AudioAccess, deadline: float) -> bytes:
    """A regular file's bytes. FIFOs, devices and sockets are refused before they are opened (reading one
    could block forever); the descriptor is checked again once open, in case the name changed meanwhile."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise APIError(400, f"{_shown(path)} is not a regular file (a folder, FIFO, device or socket)")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise APIError(400, f"{_shown(path)}: no such file") from None
    except OSError as error:
        raise APIError(400, f"{_shown(path)}: cannot read ({error.strerror})") from None
    with os.fdopen(fd, "rb", buffering=0) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise APIError(400, f"{_shown(path)} is not a regular file (a folder, FIFO, device or socket)")
        if info.st_size > access.max_bytes:
            raise _too_big(access)
        data = bytearray()
        try:
            while piece := file.read(CHUNK):
                data += piece
                if len(data) > access.max_bytes:
                    raise _too_big(access)
                if time.monotonic() > deadline:
                    raise too_slow(access)
        except OSError as error:
            raise APIError(400, f"{_shown(path)}: cannot read ({error.strerror})") from None
    return bytes(data)


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for an address on the public internet: not private, loopback, link-local, multicast, reserved
    or unspecified, also where an IPv6 address carries an IPv4 one (mapped, 6to4, Teredo)."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return is_public(address.ipv4_mapped)
        embedded = address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not is_public(embedded):
            return False
    return address.is_global and not (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    )


@dataclass(frozen=True)
class _Target:
    """One checked hop of a fetch: where to connect (an address, never a name) and what to ask for."""

    scheme: str
    host: str  # for the Host header and the TLS certificate
    port: int
    addresses: tuple[str, ...]  # what the name resolved to, every one checked: the connection goes to one
    path: str  # path and query, percent-encoded


def _target(url: str, access: AudioAccess) -> _Target:
    _check_url_text(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise APIError(400, "audio_url is not a valid URL (its host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise APIError(400, "audio_url (or a redirect) leads to a scheme other than http(s)")
    if not parts.hostname:
        raise APIError(400, "audio_url names no host")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise APIError(400, "audio_url's host is not a valid name") from None
    port = port or (443 if scheme == "https" else 80)
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise APIError(400, "could not resolve the audio_url's host") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in found]
    if not all(access.may_fetch(a) for a in addresses):
        raise APIError(403, "the audio_url's host is not a public address (private, loopback, link-local or "
                       "reserved) and not one this server may fetch from (--allow-private-urls)",
                       kind="permission_error")  # fmt: skip
    safe = "/%:@!$&'()*+,;=-._~"
    path = quote(parts.path or "/", safe=safe) + (f"?{quote(parts.query, safe=safe + '?')}" if parts.query else "")
    return _Target(scheme, host, port, tuple(map(str, addresses)), path)


def _connection(target: _Target, deadline: float) -> http.client.HTTPConnection:
    """A connection to `target` that goes to its checked addresses (the first that answers), whatever its
    name resolves to by now; the name is only the Host header and what the TLS certificate must match."""
    kind = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = kind(target.host, target.port, timeout=max(0.001, deadline - time.monotonic()))

    def pinned(_address, _timeout, source_address=None) -> socket.socket:
        failure = OSError("no address")
        for address in target.addresses:
            try:
                remaining = max(0.001, deadline - time.monotonic())
                return socket.create_connection((address, target.port), remaining, source_address)
            except OSError as error:
                failure = error
        raise failure

    connection._create_connection = pinned
    return connection


def _credentials(url: str) -> dict[str, str]:
    """user:password@ in the URL as a Basic Authorization header, as curl sends it."""
    parts = urlsplit(url)
    if parts.username is None:
        return {}
    pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}


def _download(url: str, access: AudioAccess, deadline: float) -> bytes:
    if not access.urls:
        raise APIError(403, "remote URLs are off on this server (start it with --allow-urls)",
                       kind="permission_error")  # fmt: skip
    headers = _credentials(url)
    origin = None
    for _ in range(MAX_REDIRECTS + 1):
        target = _target(url, access)
        origin = origin or (target.scheme, target.host, target.port)
        if (target.scheme, target.host, target.port) != origin:
            headers = {}  # credentials go only to the URL's own origin
        if time.monotonic() >= deadline:
            raise too_slow(access)
        connection = _connection(target, deadline)
        try:
            location = _get(connection, target, headers, access, deadline)
        finally:
            connection.close()
        if isinstance(location, bytes):
            return location
        try:
            url = urljoin(url, location)
        except ValueError:
            raise APIError(400, "the audio_url redirects to a URL that is not valid") from None
    raise APIError(400, f"the audio_url redirects more than {MAX_REDIRECTS} times")


def _get(connection: http.client.HTTPConnection, target: _Target, headers: dict[str, str], access: AudioAccess,
         deadline: float) -> bytes | str:  # fmt: skip
    """The body of a 200 answer, or the Location of a redirect. A watchdog shuts the socket at the deadline,
    so a server sending a byte now and then cannot hold the worker past it."""
    watchdog: threading.Timer | None = None
    try:
        connection.connect()
        sock = connection.sock
        watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, (sock,))
        watchdog.daemon = True
        watchdog.start()
        connection.request("GET", target.path, headers={**headers, "Accept": "audio/*, */*"})
        response = connection.getresponse()
        if response.status in REDIRECTS and response.getheader("Location"):
            return response.getheader("Location")
        if response.status != 200:
            raise APIError(400, f"could not fetch the audio_url: HTTP {response.status}")
        declared = response.getheader("Content-Length", "")
        if declared.isdigit() and int(declared) > access.max_bytes:
            raise _too_big(access)
        data = bytearray()
        while piece := response.read1(CHUNK):
            data += piece
            if len(data) > access.max_bytes:
                raise _too_big(access)
        if time.monotonic() >= deadline:  # the watchdog cut it short
            raise too_slow(access)
        return bytes(data)
    except APIError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as error:
        if time.monotonic() >= deadline:
            raise too_slow(access) from None
        reason = "the TLS handshake failed" if isinstance(error, ssl.SSLError) else "the connection failed"
        raise APIError(400, f"could not fetch the audio_url: {reason}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread; close() would not
    except OSError:
        pass
