"""The one retry policy on a real redis-server: a call made during an outage waits for the server
to come back (no error, counted as one outage), and a stop check makes it give up."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import redis

from keisei_stream.wire import retry
from keisei_stream.ops.embedded_redis import start_redis
from keisei_stream.wire.client import connect

pytestmark = pytest.mark.redis


def test_a_call_during_an_outage_waits_for_the_server(tmp_path):
    server = start_redis(tmp_path)
    r = connect(server.url)
    try:
        r.set("k", "before")
        os.kill(server.pid, signal.SIGKILL)
        server.process.wait(5)
        before = retry.OUTAGES.outages
        result: dict = {}

        def call():
            t0 = time.monotonic()
            result["value"] = r.get("k")  # the server restarts empty (no persistence)
            r.set("k", "after")
            result["seconds"] = time.monotonic() - t0

        t = threading.Thread(target=call)
        t.start()
        time.sleep(3.0)
        assert t.is_alive(), "the call must wait for the server, not fail"
        assert retry.OUTAGES.since is not None
        server = start_redis(tmp_path)
        t.join(30)
        assert not t.is_alive()
        assert result["value"] is None and r.get("k") == b"after"
        assert result["seconds"] >= 3.0
        assert retry.OUTAGES.outages == before + 1 and retry.OUTAGES.since is None
        assert retry.OUTAGES.fields()["redis_outage_s"] >= 3.0
    finally:
        r.close()
        server.stop()


def test_a_stop_check_ends_the_wait(tmp_path):
    server = start_redis(tmp_path)
    r = connect(server.url)
    server.stop()
    retry.set_stop_check(lambda: True)
    try:
        t0 = time.monotonic()
        with pytest.raises(redis.ConnectionError):
            r.ping()
        assert time.monotonic() - t0 < 5
    finally:
        retry.set_stop_check(None)
        r.close()


def test_wait_for_room_waits_out_a_full_server_and_logs_once(caplog):
    """An OOM refusal at start is backpressure: retried with backoff until the write goes in."""
    import logging

    from redis.exceptions import OutOfMemoryError, ResponseError

    from keisei_stream.wire import retry

    calls = []

    def write():
        calls.append(1)
        if len(calls) < 4:
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        return "OK"

    with caplog.at_level(logging.WARNING, logger="keisei.redis"):
        assert retry.wait_for_room("the group", write) == "OK"
    assert len(calls) == 4
    lines = [r.getMessage() for r in caplog.records]
    assert sum("waits until it has room" in x for x in lines) == 1 and sum("room again" in x for x in lines) == 1

    def other():
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")

    import pytest

    with pytest.raises(ResponseError, match="WRONGTYPE"):
        retry.wait_for_room("x", other)
