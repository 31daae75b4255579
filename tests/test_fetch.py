"""acecap serve reading audio_url files and URLs: workers, deadlines and size caps of their own, the address
policy after DNS with the connection pinned to the checked address, redirects re-checked, and errors that
say nothing about what answered. Real servers throughout: uvicorn, http.server threads, raw sockets, FIFOs.
"""

from __future__ import annotations

import asyncio
import base64
import http.server
import ipaddress
import os
import socket
import ssl
import threading
import time

import httpx
import pytest
from test_serve import audio_part, body, post, refused, url_part, wav_bytes

from acecap import Captioner
from acecap.fetch import AudioAccess, _connection, _Target, is_public
from acecap.serve import ServeConfig, running

LOOPBACK = ("127.0.0.0/8",)


@pytest.fixture(scope="module")
def captioner(tiny_model) -> Captioner:
    return Captioner.from_pretrained(tiny_model, device="cpu")


class Site:
    """A real HTTP server on `host`, serving /song.wav, redirects (/redirect?to=URL, /loop), a slow body (/trickle)
    and slow headers (/slow-headers); it records each request's path and Authorization header."""

    def __init__(self, host: str = "127.0.0.1"):
        self.requests: list[tuple[str, str | None]] = []
        self.stop = threading.Event()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                site.requests.append((self.path, self.headers.get("Authorization")))
                path, _, query = self.path.partition("?")
                if path == "/song.wav":
                    data = wav_bytes(0.5)
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif path in ("/redirect", "/loop"):
                    self.send_response(302)
                    self.send_header("Location", query.removeprefix("to=") if path == "/redirect" else "/loop")
                    self.end_headers()
                elif path == "/trickle":  # headers at once, then a byte every 10 s
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    while not site.stop.wait(10):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                elif path == "/slow-headers":
                    for byte in b"HTTP/1.1 200 OK\r\n":
                        if site.stop.wait(10):
                            return
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                else:
                    self.send_error(404)

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def site():
    running_site = Site()
    yield running_site
    running_site.close()


@pytest.fixture
def other_site():
    """A second server on another loopback address: 127.0.0.2 (Linux answers on all of 127/8)."""
    running_site = Site("127.0.0.2")
    yield running_site
    running_site.close()


@pytest.mark.parametrize(
    "address, public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),  # IPv4-mapped: judged by the IPv4 address it carries
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),  # carrier-grade NAT
        ("169.254.169.254", False),  # link-local: cloud metadata services
        ("0.0.0.0", False),
        ("224.0.0.1", False),  # multicast, which ipaddress calls global
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:169.254.169.254", False),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1, which ipaddress calls global
        ("64:ff9b::7f00:1", False),  # NAT64
    ],
)
def test_which_addresses_are_public(address, public):
    assert is_public(ipaddress.ip_address(address)) is public


def test_loopback_in_any_spelling_is_refused_and_never_contacted(captioner, site):
    port = site.url.rsplit(":", 1)[1]
    spellings = [f"127.0.0.1:{port}", f"localhost:{port}", f"2130706433:{port}", f"0x7f.1:{port}",
                 f"017700000001:{port}", f"127.1:{port}", f"[::1]:{port}", f"[::ffff:127.0.0.1]:{port}",
                 f"0.0.0.0:{port}", "169.254.169.254", "10.0.0.1", "224.0.0.1",
                 f"admin:hunter2@127.0.0.1:{port}"]  # fmt: skip
    with running(captioner, ServeConfig(access=AudioAccess(urls=True))) as url:
        for host in spellings:
            answer = post(url, body(url_part(f"http://{host}/song.wav")))
            refused(answer, 403, "not a public address")
            assert "hunter2" not in answer.text and "admin" not in answer.text and "127.0.0.1" not in answer.text
    assert site.requests == []


def test_allowed_private_networks_and_redirects_checked_again(captioner, site, other_site):
    """Only 127.0.0.2 is allowed: a redirect from there to 127.0.0.1 is refused before it is followed."""
    access = AudioAccess(urls=True, private_networks=("127.0.0.2/32",))
    with running(captioner, ServeConfig(access=access, max_new_tokens=4)) as url:
        assert post(url, body(url_part(f"{other_site.url}/song.wav"))).status_code == 200
        local = f"{other_site.url}/redirect?to=/song.wav"
        assert post(url, body(url_part(local))).status_code == 200  # a redirect within the allowed host
        refused(post(url, body(url_part(f"{site.url}/song.wav"))), 403, "not a public address")
        refused(post(url, body(url_part(f"{other_site.url}/redirect?to={site.url}/song.wav"))), 403,
                "not a public address")  # fmt: skip
        refused(post(url, body(url_part(f"{other_site.url}/redirect?to=file:///etc/passwd"))), 400,
                "scheme other than http(s)")  # fmt: skip
        refused(post(url, body(url_part(f"{other_site.url}/loop"))), 400, "redirects more than 5")
    assert site.requests == []


def test_credentials_go_to_their_own_origin_only_and_are_never_echoed(captioner, site, other_site):
    with running(captioner, ServeConfig(access=AudioAccess(urls=True, private_networks=LOOPBACK))) as url:
        host = other_site.url.removeprefix("http://")
        answer = post(url, body(url_part(f"http://admin:hunter2@{host}/missing.wav")))
        refused(answer, 400, "could not fetch the audio_url: HTTP 404")
        assert "hunter2" not in answer.text and "admin" not in answer.text
        expected = "Basic " + base64.b64encode(b"admin:hunter2").decode()
        assert other_site.requests == [("/missing.wav", expected)]
        assert post(url, body(url_part(f"http://admin:hunter2@{host}/redirect?to={site.url}/song.wav"),
                              max_tokens=2)).status_code == 200  # fmt: skip
        assert other_site.requests[-1][1] == expected and site.requests == [("/song.wav", None)]


@pytest.fixture
def banner():
    """A TCP port that answers like an SSH server, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = server.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"SSH-2.0-OpenSSH_9.6 secret-host-banner\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


def test_errors_say_nothing_of_what_answered(captioner, banner):
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    with running(captioner, ServeConfig(access=AudioAccess(urls=True, private_networks=LOOPBACK))) as url:
        answers = [post(url, body(url_part(f"http://127.0.0.1:{port}/a.wav"))) for port in (banner, closed_port)]
    for answer in answers:  # an SSH server and a closed port look the same from outside
        refused(answer, 400, "could not fetch the audio_url: the connection failed")
        assert "SSH" not in answer.text and "banner" not in answer.text and "refused" not in answer.text.lower()
    assert answers[0].json() == answers[1].json()


def test_the_connection_goes_to_the_checked_address_not_a_new_lookup(site):
    """Pinned: a name that no longer resolves (or resolves elsewhere) is never looked up again; the
    connection goes to the checked address and the name is only the Host header."""
    port = int(site.url.rsplit(":", 1)[1])
    target = _Target("http", "rebinding.invalid", port, ("127.0.0.1",), "/song.wav")
    connection = _connection(target, deadline=time.monotonic() + 5)
    try:
        connection.request("GET", target.path)
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert site.requests == [("/song.wav", None)]


def test_urls_with_spaces_or_bad_ports_are_refused(captioner, site):
    with running(captioner, ServeConfig(access=AudioAccess(urls=True, private_networks=LOOPBACK))) as url:
        refused(post(url, body(url_part(f"{site.url}/my song.wav"))), 400, "space or a control character")
        refused(post(url, body(url_part("http://127.0.0.1:99999/a.wav"))), 400, "not a valid URL")
        refused(post(url, body(url_part("http:///a.wav"))), 400, "names no host")
        refused(post(url, body(url_part("http://a..b/a.wav"))), 400, "not a valid name")
        assert post(url, body(url_part(f"{site.url}/song.wav?q=é"), max_tokens=2)).status_code == 200
    assert site.requests == [("/song.wav?q=%C3%A9", None)]


def answered_at(url: str, payloads: list[dict]) -> list[tuple[httpx.Response, float]]:
    """Post the payloads at once; each answer with its seconds since the start."""

    async def run():
        start = time.monotonic()
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def timed(payload: dict) -> tuple[httpx.Response, float]:
                answer = await client.post("/v1/chat/completions", json=payload)
                return answer, time.monotonic() - start

            return await asyncio.gather(*(timed(payload) for payload in payloads))

    return asyncio.run(run())


def test_slow_sources_hold_only_their_own_workers_and_get_504_on_time(captioner, site):
    """8 sources that never finish (a byte per 10 s, body or headers) against 2 fetch workers: a normal
    request is answered meanwhile, each slow one gets 504 at its deadline, and the workers are free again."""
    access = AudioAccess(urls=True, private_networks=LOOPBACK, timeout_s=4)
    config = ServeConfig(fetch_workers=2, max_new_tokens=4, access=access)
    normal = body(audio_part(wav_bytes(0.5)), max_tokens=2)
    slow = [body(url_part(f"{site.url}/{'trickle' if n % 2 else 'slow-headers'}")) for n in range(8)]
    with running(captioner, config) as url:
        *slow, (reply, reply_at) = answered_at(url, slow + [normal])
        assert reply.status_code == 200 and reply_at < 4, (reply.text, reply_at)
        for answer, at in slow:
            refused(answer, 504, "longer than the server's 4 s (--fetch-timeout)")
            assert 3.9 < at < 8, at
        # The watchdog closed the slow connections at the deadline: both workers take new fetches at once.
        started = time.monotonic()
        assert post(url, body(url_part(f"{site.url}/song.wav"), max_tokens=2)).status_code == 200
        assert time.monotonic() - started < 4


def test_fifos_and_other_non_regular_files_are_refused_at_once(captioner, tmp_path):
    """A FIFO would block its reader forever; 8 at once, and a normal request is still answered."""
    os.mkfifo(tmp_path / "pipe.wav")
    (tmp_path / "folder.wav").mkdir()
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    (tmp_path / "big.wav").write_bytes(wav_bytes(2.0))
    (tmp_path / "song.wav").write_bytes(wav_bytes(0.5))
    access = AudioAccess(files=tmp_path, max_bytes=40_000, timeout_s=30)
    fifos = [body(url_part(f"file://{tmp_path}/pipe.wav")) for _ in range(8)]
    with running(captioner, ServeConfig(fetch_workers=2, max_new_tokens=4, access=access)) as url:
        *fifos, (reply, _) = answered_at(url, fifos + [body(audio_part(wav_bytes(0.5)), max_tokens=2)])
        assert reply.status_code == 200
        for answer, at in fifos:
            refused(answer, 400, "is not a regular file")
            assert at < 10
        refused(post(url, body(url_part(f"file://{tmp_path}/folder.wav"))), 400, "is not a regular file")
        refused(post(url, body(url_part(f"file://{tmp_path}/loop.wav"))), 400, "cannot be resolved")
        refused(post(url, body(url_part(f"file://{tmp_path}/big.wav"))), 413, "over the server's limit")
        refused(post(url, body(url_part(f"file://{tmp_path}/song.wav%00.txt"))), 400, "NUL character")
        refused(post(url, body(url_part(f"file://{tmp_path}/my song.wav"))), 400, "space or a control character")
        refused(post(url, body(url_part(f"file://elsewhere{tmp_path}/song.wav"))), 400, "a path on this server")
        assert post(url, body(url_part(f"file://{tmp_path}/song.wav"), max_tokens=2)).status_code == 200


@pytest.fixture
def tls_site(tmp_path, monkeypatch):
    """An HTTPS server on 127.0.0.1 whose certificate names "audio.test" and 127.0.0.1, from a CA that
    this process trusts (SSL_CERT_FILE) for the test."""
    import trustme

    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    running_site = Site()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("audio.test", "127.0.0.1").configure_cert(context)
    running_site.httpd.socket = context.wrap_socket(running_site.httpd.socket, server_side=True)
    yield running_site
    running_site.close()


def test_https_is_verified_against_the_name_while_connecting_to_the_checked_address(captioner, tls_site):
    port = int(tls_site.url.rsplit(":", 1)[1])
    for name, verified in (("audio.test", True), ("other.test", False)):
        target = _Target("https", name, port, ("127.0.0.1",), "/song.wav")
        connection = _connection(target, deadline=time.monotonic() + 10)
        try:
            connection.request("GET", target.path)
            assert verified and connection.getresponse().status == 200
        except ssl.SSLCertVerificationError:
            assert not verified
        finally:
            connection.close()
    with running(captioner, ServeConfig(access=AudioAccess(urls=True, private_networks=LOOPBACK))) as url:
        assert post(url, body(url_part(f"https://127.0.0.1:{port}/song.wav"), max_tokens=2)).status_code == 200
        refused(post(url, body(url_part(f"https://localhost:{port}/song.wav"))), 400, "the TLS handshake failed")
