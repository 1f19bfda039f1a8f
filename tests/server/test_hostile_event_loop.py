"""The event loop stays free under hostile load: tokenizing runs in a bounded worker pool, so
/health answers while a huge tokenize runs, and a full pool answers 429 instead of queueing.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.server.conftest import start_server
from tests.server.hostile import assert_error, assert_still_serving, post

pytestmark = pytest.mark.model


def test_health_answers_while_a_huge_tokenize_runs(live_server):
    text = "The quick brown fox jumps over the lazy dog. " * 70_000  # 3.15 MB, 700k tokens: seconds of work
    events: list[str] = []

    def big():
        with httpx.stream("POST", live_server.url + "/tokenize", json={"prompt": text}, timeout=300) as response:
            events.append(f"big headers {response.status_code}")
            response.read()

    thread = threading.Thread(target=big)
    thread.start()
    while thread.is_alive() and not any(e.startswith("big") for e in events):
        health = httpx.get(live_server.url + "/health", timeout=300)
        events.append(f"health {health.status_code}")
    thread.join(timeout=300)
    big_at = events.index("big headers 200")
    # /health kept answering while the big request was being served (before the loop fix: at most once)
    assert events[:big_at].count("health 200") >= 3, events[: big_at + 1]


def test_worker_pool_queue_is_bounded(smollm):
    with start_server(smollm, max_new=4, max_active_sessions=1, max_queued_requests=1) as live:
        state = live.server.config.app.state.kvmux
        assert state.max_cpu_pending == 2
        text = "The quick brown fox jumps over the lazy dog. " * 70_000
        big: list[httpx.Response] = []

        def tokenize_big():
            big.append(post(live.url, "/tokenize", {"prompt": text}, timeout=300))

        threads = [threading.Thread(target=tokenize_big, daemon=True) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 120
        while state.cpu_pending < 2 and any(t.is_alive() for t in threads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert state.cpu_pending == 2, "the large tokenizations never filled the worker pool"
        refused = post(live.url, "/tokenize", {"prompt": "hi"})
        assert_error(refused, 429)
        assert refused.headers["retry-after"] == "1"
        for thread in threads:
            thread.join(timeout=300)
        assert [r.status_code for r in big] == [200, 200] and big[0].json()["count"] > 500_000
        assert post(live.url, "/tokenize", {"prompt": "hi"}).status_code == 200
        assert_still_serving(live.url)
