"""Hostile request bodies against a live server: each gets a 4xx in the OpenAI error shape (never a
500, a stall or unbounded work), and the server still serves a normal request afterwards.

Covers the body limit on chunked uploads, a client leaving a chunked stream, bodies that stall
before they arrive, and bodies that are not JSON.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.server.hostile import LIMIT, assert_error, assert_still_serving

pytestmark = pytest.mark.model


def chunks(data: bytes, size: int = 8192):
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("path", ["/tokenize", "/v1/completions"])
def test_chunked_body_over_the_limit_is_413(hostile_server, path):
    body = json.dumps({"prompt": "x" * (2 * LIMIT), "max_tokens": 1}).encode()
    response = httpx.post(
        hostile_server.url + path, content=chunks(body), headers={"content-type": "application/json"}, timeout=60
    )
    assert "content-length" not in response.request.headers  # sent with Transfer-Encoding: chunked
    error = assert_error(response, 413)
    assert str(LIMIT) in error["message"]
    assert_still_serving(hostile_server.url)


def test_chunked_body_within_the_limit_is_served(hostile_server):
    body = json.dumps({"prompt": "Hello " * 8000, "add_special_tokens": False}).encode()
    assert LIMIT / 2 < len(body) < LIMIT
    response = httpx.post(hostile_server.url + "/tokenize", content=chunks(body, 1000), timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["count"] >= 8000


def test_client_leaving_a_chunked_stream_still_cancels_its_request(hostile_server):
    scheduler = hostile_server.state.scheduler
    original = scheduler.engine.max_new_tokens
    scheduler.engine.max_new_tokens = 3000  # long enough to still run when the client leaves
    try:
        body = json.dumps({"prompt": "Count: one, two,", "max_tokens": 3000, "stream": True, "ignore_eos": True})
        with httpx.Client(timeout=60) as client:
            with client.stream(
                "POST", hostile_server.url + "/v1/completions", content=chunks(body.encode(), 7)
            ) as response:
                assert response.status_code == 200
                seen = 0
                for line in response.iter_lines():
                    seen += line.startswith("data: ")
                    if seen == 2:
                        break  # closing the connection mid-stream
        deadline = time.monotonic() + 60
        while scheduler.num_running and time.monotonic() < deadline:
            time.sleep(0.05)
        assert scheduler.num_running == 0  # cancelled long before 3000 tokens
    finally:
        scheduler.engine.max_new_tokens = original


def send_stalled_body(port: int, headers: str, body: bytes) -> str:
    """Send the headers and part of a body, then nothing more; the server's answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(headers.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer.decode("latin-1")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_stalled_body_is_408(hostile_server, framing):
    part = b'{"prompt": "Hel'
    if framing == "chunked":
        head, body = "Transfer-Encoding: chunked\r\n", f"{len(part):x}\r\n".encode() + part + b"\r\n"
    else:
        head, body = "Content-Length: 1000\r\n", part
    request = f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{head}"
    answer = send_stalled_body(hostile_server.port, request, body)
    status_line, _, rest = answer.partition("\r\n")
    assert status_line.split()[1] == "408", answer
    error = json.loads(rest[rest.index("\r\n\r\n") + 4 :])["error"]
    assert error["code"] == 408 and error["type"] == "TimeoutError" and "did not arrive" in error["message"]
    assert_still_serving(hostile_server.url)


def test_form_encoded_body_is_a_400_asking_for_json(hostile_server):
    response = httpx.post(hostile_server.url + "/v1/completions", data={"prompt": "hi"}, timeout=60)
    error = assert_error(response, 400)
    assert "application/json" in error["message"]
