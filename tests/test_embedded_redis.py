"""The private server launcher and the client settings."""

from __future__ import annotations

import pytest
import redis

from keisei_stream.ops.embedded_redis import RedisStartError, find_server_binary, start_redis
from keisei_stream.wire.client import SOCKET_TIMEOUT_S, connect

pytestmark = pytest.mark.redis


def test_start_stop_clean(tmp_path):
    server = start_redis(tmp_path / "run", maxmemory="64mb")
    try:
        assert server.url.startswith("unix://") and server.socket_path.exists()
        r = connect(server.url)
        assert r.ping()
        cfg = r.config_get("*")
        assert cfg["port"] == "0" and cfg["save"] == "" and cfg["appendonly"] == "no"
        assert cfg["maxmemory-policy"] == "noeviction" and int(cfg["maxmemory"]) == 64 * 1024 * 1024
        r.close()
    finally:
        server.stop()
    assert not server.alive() and not server.socket_path.exists()
    server.stop()  # idempotent
    with pytest.raises(redis.ConnectionError):
        redis.Redis(unix_socket_path=str(server.socket_path), socket_connect_timeout=1,
                    retry=None).ping()


def test_context_manager_and_long_path(tmp_path):
    deep = tmp_path / ("x" * 60) / ("y" * 60)
    with start_redis(deep) as server:
        assert len(str(server.socket_path)) <= 100
        assert connect(server.url).set("k", b"v")
        sock = server.socket_path
    assert not sock.exists()


def test_noeviction_refuses_writes_when_full(tmp_path):
    with start_redis(tmp_path, maxmemory="2mb") as server:
        r = connect(server.url)
        with pytest.raises(redis.ResponseError, match="OOM|maxmemory"):
            for i in range(100):
                r.set(f"k{i}", b"x" * 200_000)


def test_client_defaults(redis_server):
    r = connect(redis_server.url)
    kw = r.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == SOCKET_TIMEOUT_S > 60  # above every XREADGROUP BLOCK allowed
    assert r.get_retry() is not None
    assert find_server_binary()


def test_bad_maxmemory_fails_fast(tmp_path):
    with pytest.raises(RedisStartError):
        start_redis(tmp_path, maxmemory="lots", timeout=5)
