"""Hostile HTTP clients against the real app on a real socket (uvicorn on 127.0.0.1), over the
routes' fake service: bodies that never end, bodies that barely arrive, JSON nested 100k deep,
lone surrogates, and a handler that fails. Each gets a JSON error, never a plain-text 500, and
the server (and, where the body was read, the keep-alive connection) goes on serving."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from mondrian.serve.app import create_app
from tests.test_http_routes import FakeService


class _Server:
    def __init__(self, service: FakeService):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "uvicorn did not start"
            time.sleep(0.02)

    def conn(self, timeout: float = 20) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def server(request):
    service = FakeService()
    service.cfg.body_timeout_s = 1.0
    if request.node.name.startswith("test_deep_json"):
        service.cfg.max_body_bytes = 1 << 20
    srv = _Server(service)
    srv.service = service
    yield srv
    srv.stop()


def _json_error(resp: http.client.HTTPResponse, status: int, text: str) -> dict:
    body = resp.read()
    assert resp.status == status, body
    assert resp.getheader("content-type", "").startswith("application/json"), body
    err = json.loads(body)["error"]
    assert text in err["message"], err
    return err


def _raw(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    s.sendall(head)
    return s


def _status_of(s: socket.socket) -> tuple[int, bytes]:
    """The status and the raw response (head and body, by its Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.lower().split(b"\r\n")
                   if line.startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split()[1]), head + b"\r\n\r\n" + body


def test_deep_json_and_lone_surrogates_are_400s_on_a_kept_connection(server):
    conn = server.conn()
    deep = ("[" * 100_000 + "]" * 100_000).encode()  # 200 kB, so the 4 kB limit is raised
    for body, text in [(deep, "nested too deeply"), (b'{"text": "wind \\ud800 in kent"}', "lone surrogate"),
                       (b'{"text": "ok", "user": "\\udfff"}', "lone surrogate"), (b"\xff\xfe", "not JSON")]:
        conn.request("POST", "/v1/advisors/adv/analyze", body=body, headers={"Content-Type": "application/json"})
        _json_error(conn.getresponse(), 400, text)
    conn.request("GET", "/health")  # the same connection still serves
    assert conn.getresponse().status == 200


def test_a_chunked_body_is_cut_at_the_limit_not_buffered(server):
    limit = server.service.cfg.max_body_bytes  # 4 kB
    s = _raw(server.port, b"POST /v1/advisors/adv/analyze HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1024, b" " * 1024)
    sent = 0
    s.settimeout(0.05)
    status = None
    while sent < 50 * 1024 * 1024 and status is None:  # an endless body, as far as the server knows
        try:
            s.sendall(chunk)
            sent += 1024
        except OSError:
            break  # the server closed the connection on us: look at its answer
        try:
            if s.recv(1, socket.MSG_PEEK):
                status = True
        except (TimeoutError, BlockingIOError):
            pass
    s.settimeout(20)
    code, raw = _status_of(s)
    assert code == 413 and b"application/json" in raw and b"over 4096 bytes" in raw
    assert sent < 100 * limit, f"the server read {sent:,} bytes before refusing"
    s.close()
    conn = server.conn()
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_a_slow_body_gets_a_408_at_the_deadline(server):
    s = _raw(server.port, b"POST /v1/advisors/adv/analyze HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    t0 = time.perf_counter()
    s.settimeout(0.25)
    code = raw = None
    for _ in range(40):  # one byte every 0.25 s: 10 s to send it all
        try:
            s.sendall(b" ")
        except OSError:
            break
        try:
            code, raw = _status_of(s)
            break
        except TimeoutError:
            continue
    if code is None:
        s.settimeout(20)
        code, raw = _status_of(s)
    waited = time.perf_counter() - t0
    assert code == 408 and b"did not arrive within 1 s" in raw, raw
    assert waited < 5, waited  # the 1 s deadline, not the 10 s the client would take
    s.close()


def test_an_unexpected_error_is_a_json_500_and_the_connection_lives(server):
    async def broken(advisor, text, **kw):
        raise KeyError("a bug")

    server.service.answer = broken
    conn = server.conn()
    conn.request("POST", "/v1/advisors/adv/analyze", body=json.dumps({"text": "hi"}),
                 headers={"Content-Type": "application/json"})
    err = _json_error(conn.getresponse(), 500, "internal error (KeyError)")
    assert err["type"] == "server_error"
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_health_is_503_with_the_problem(server):
    server.service.problem_list = ["the request database x.db was deleted while the service ran"]
    conn = server.conn()
    conn.request("GET", "/health")
    resp = conn.getresponse()
    body = json.loads(resp.read())
    assert resp.status == 503 and body["status"] == "error" and "deleted" in body["problems"][0]
