"""Wire codec: round trip, size, and rejection of every kind of bad or hostile entry."""

from __future__ import annotations

import copy
import hashlib

import lz4.block
import msgpack
import numpy as np
import pytest

from conftest import MAYBE_VALID, MUTATIONS
from helpers import scripted_game
from keisei_stream.shogi import EndReason, encode_positions
from keisei_stream.experience import ExperienceBatch, concat_batches, schema
from keisei_stream.wire import codec, replay
from keisei_stream.wire.codec import decode_entry, encode_batch
from keisei_stream.wire.errors import BadEntry


def as_wire(fields):
    """What redis-py hands back for an entry: bytes keys and values."""
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items()}


def test_round_trip_and_fields(make_batch):
    b = make_batch(300, max_plies=64, seed=1, version=7)
    f = encode_batch(b)
    assert set(f) == {"d", "w", "v", "n", "s"}
    assert f["w"] == "w0" and f["v"] == 7 and f["n"] == b.num_positions and f["s"] == schema.SCHEMA_VERSION
    d = decode_entry(as_wire(f), max_plies=64)
    for name in schema.COLUMNS:
        got, want = getattr(d, name), getattr(b, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
        assert got.flags.writeable
    assert d.batch_id == b.batch_id and d.worker_id == "w0"
    assert d.num_positions == b.num_positions and d.num_segments == b.num_segments
    # str keys/values (a decode_responses client) are accepted too
    assert decode_entry({k: (v if isinstance(v, bytes) else str(v)) for k, v in f.items()}, max_plies=64).num_positions == b.num_positions


@pytest.mark.parametrize("segment_plies", [0, 32])
def test_bytes_per_position_under_target(make_batch, segment_plies):
    """<= 30 bytes a position on the wire, whole games or segments of 32 plies (the default)."""
    b = make_batch(2000, max_plies=256, seed=2, num_games=16, segment_plies=segment_plies)
    # behaviour values of a real network are not compressible: make them random float32
    b.value = np.random.default_rng(0).uniform(-1, 1, b.num_positions).astype(np.float32)
    b.log_prob = np.random.default_rng(1).uniform(-8, 0, b.num_positions).astype(np.float32)
    b.bootstrap[~b.ended] = np.random.default_rng(2).uniform(-1, 1, int((~b.ended).sum())).astype(np.float32)
    b.bootstrap_advantage[~b.ended] = np.random.default_rng(3).uniform(-1, 1, int((~b.ended).sum())).astype(np.float32)
    per_pos = codec.wire_bytes(encode_batch(b)) / b.num_positions
    assert per_pos <= 30, per_pos


def test_segments_round_trip_and_replay_from_their_start(make_batch):
    """Games cut every 8 plies: the cut segments (no result, a bootstrap value) start mid-game and
    are replayed from their first position; an ended one is the game's last segment."""
    b = make_batch(600, max_plies=64, seed=21, segment_plies=8, lookahead_plies=4)
    cut = ~b.ended
    assert cut.any() and b.ended.any()
    starts = b.ply[b.segment_offsets[:-1].astype(int)]
    assert (starts[cut] % 8 == 0).all() and (starts > 0).any()
    assert (np.diff(b.segment_offsets)[cut] == 8).all() and (np.diff(b.segment_offsets)[b.ended] <= 8 + 4).all()
    assert (b.result[cut] == 0).all() and (b.bootstrap[b.ended] == 0).all() and (b.bootstrap[cut] != 0).any()
    assert (b.bootstrap_advantage[b.ended] == 0).all() and (b.bootstrap_advantage[cut] != 0).any()
    d = decode_entry(as_wire(encode_batch(b)), max_plies=64)
    for name in schema.COLUMNS:
        assert np.array_equal(getattr(d, name), getattr(b, name)), name


def test_a_cut_segment_that_ended_its_game_is_refused(make_batch):
    """A checkmate (or any end) recorded as a cut: the referee sees the end after the last move."""
    b = make_batch(8000, max_plies=256, seed=3, num_games=16, segment_plies=32)
    ended = np.flatnonzero(b.ended & (b.reason != EndReason.MAX_PLIES))
    assert ended.size, "random play ended no game before max_plies"
    bad = copy.deepcopy(b)
    bad.reason[ended[0]], bad.result[ended[0]] = 0, 0
    with pytest.raises(BadEntry, match="referee says"):
        decode_entry(as_wire(encode_batch(bad)), max_plies=256)
    at_limit = np.flatnonzero(b.reason == EndReason.MAX_PLIES)  # a draw at max_plies recorded as a cut
    if at_limit.size:
        bad = copy.deepcopy(b)
        bad.reason[at_limit[0]] = 0
        with pytest.raises(BadEntry, match="max_plies"):
            decode_entry(as_wire(encode_batch(bad)), max_plies=256)


def test_final_rewards_and_turns(make_batch):
    b = make_batch(400, max_plies=256, seed=3, num_games=8)
    r = b.final_rewards()
    last = b.segment_offsets[1:].astype(int) - 1
    mover_black = b.turns()[last] == 0
    assert np.array_equal(r, np.where(mover_black, b.result, -b.result).astype(np.float32))
    assert np.all(r[b.reason == EndReason.CHECKMATE] == 1.0)
    assert np.all(r[b.reason == EndReason.MAX_PLIES] == 0.0)


def test_training_inputs(make_batch):
    b = make_batch(100, max_plies=64, seed=4)
    d = decode_entry(as_wire(encode_batch(b)), max_plies=64)
    obs, mask = encode_positions(d.hcp, d.ply, d.repetition, 64)
    assert obs.shape == (d.num_positions, 46, 9, 9) and obs.dtype == np.float32
    assert mask.shape == (d.num_positions, 13527) and mask.dtype == bool
    assert mask[np.arange(d.num_positions), d.action.astype(int)].all()


def test_opening_plies_games_accepted(make_batch):
    b = make_batch(200, max_plies=64, seed=5, opening_plies=6)
    assert b.ply[b.segment_offsets[:-1].astype(int)].min() >= 6
    decode_entry(as_wire(encode_batch(b)), max_plies=64)


def _play(usi_moves, max_plies=64, sfen=None, ply0=0):
    """A batch holding one game, ended by its last move (:func:`helpers.scripted_game`)."""
    b = scripted_game(usi_moves, sfen, ply0, max_plies, game=0, worker="t")
    assert b.reason[0], "game did not end"
    return b


def test_repetition_game_validated():
    shuffle = ["5i5h", "5a5b", "5h5i", "5b5a"]
    b = _play(shuffle * 3)
    assert b.reason[0] == EndReason.REPETITION_DRAW and b.result[0] == 0
    assert b.repetition.max() == 2
    decode_entry(as_wire(encode_batch(b)), max_plies=64)
    bad = copy.deepcopy(b)
    bad.reason[:] = EndReason.MAX_PLIES
    with pytest.raises(BadEntry):
        decode_entry(as_wire(encode_batch(bad)), max_plies=64)
    bad = copy.deepcopy(b)
    bad.repetition[5] = 0  # this position was seen before
    with pytest.raises(BadEntry, match="repetition"):
        decode_entry(as_wire(encode_batch(bad)), max_plies=64)


def test_entering_king_game_validated():
    # White moves, then Black (king and 10 pieces in the camp, 28 points with its hand) can declare
    # (recorded from ply 1: White moves at odd plies, and a game's ply 0 is the initial position)
    b = _play(["5i5h"], max_plies=1, sfen="B7R/4K4/+P+P+P+P1+P+P+P+P/9/9/9/ppppppppp/9/4k4 w RB4g4s4n4lp 1", ply0=1)
    assert b.reason[0] == EndReason.ENTERING_KING and b.result[0] == 1
    decode_entry(as_wire(encode_batch(b)), max_plies=2)
    # the same game relabelled as a max-plies draw: the env ends it by declaration first
    bad = copy.deepcopy(b)
    bad.reason[:] = EndReason.MAX_PLIES
    bad.result[:] = 0
    with pytest.raises(BadEntry, match="referee says ENTERING_KING"):
        decode_entry(as_wire(encode_batch(bad)), max_plies=2)
    # recorded from ply 0: not the initial position
    with pytest.raises(BadEntry, match="White to move at ply 0"):
        decode_entry(as_wire(encode_batch(_play(["5i5h"], max_plies=1, sfen=
                                                "B7R/4K4/+P+P+P+P1+P+P+P+P/9/9/9/ppppppppp/9/4k4 w RB4g4s4n4lp 1"))),
                     max_plies=1)


def _one_game(b, g):
    s, e = int(b.segment_offsets[g]), int(b.segment_offsets[g + 1])
    return ExperienceBatch(
        batch_id=b.batch_id, worker_id=b.worker_id,
        **{name: getattr(b, name)[s:e].copy() for name in schema.POSITION.names},
        **{name: getattr(b, name)[g:g + 1].copy() for name in schema.SEGMENT.names},
        segment_offsets=np.array([0, e - s], np.uint32))


def test_checkmate_game_validated(make_batch):
    b = make_batch(3000, max_plies=256, seed=3, num_games=16)
    mates = np.flatnonzero(b.reason == EndReason.CHECKMATE)
    assert mates.size, "random play produced no checkmate"
    game = _one_game(b, int(mates[0]))
    decode_entry(as_wire(encode_batch(game)), max_plies=256)
    bad = copy.deepcopy(game)
    bad.result[:] = -bad.result
    with pytest.raises(BadEntry, match="CHECKMATE"):
        decode_entry(as_wire(encode_batch(bad)), max_plies=256)
    # a non-mating last move labelled CHECKMATE (game cut one move early, result kept)
    bad = _one_game(b, int(mates[0]))
    cut = copy.deepcopy(bad)
    p = cut.num_positions - 2
    for name in schema.POSITION.names:
        setattr(cut, name, getattr(cut, name)[:p])
    cut.segment_offsets = np.array([0, p], np.uint32)
    with pytest.raises(BadEntry, match="CHECKMATE"):
        decode_entry(as_wire(encode_batch(cut)), max_plies=256)
    # and a mate relabelled as a max-plies draw
    bad.reason[:] = EndReason.MAX_PLIES
    bad.result[:] = 0
    with pytest.raises(BadEntry):
        decode_entry(as_wire(encode_batch(bad)), max_plies=256)


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_each_mutation_rejected(kind, make_batch, hostile_entries):
    entries = [f for k, f in hostile_entries(len(MUTATIONS) * 3, seed=7) if k == kind]
    assert entries
    for fields in entries:
        if kind in MAYBE_VALID:
            try:
                decode_entry(fields, max_plies=64, max_version=1000)
            except BadEntry:
                pass
        else:
            with pytest.raises(BadEntry):
                decode_entry(fields, max_plies=64, max_version=1000)


def test_specific_reasons(make_batch):
    b = make_batch(100, max_plies=64, seed=8)
    good = as_wire(encode_batch(b))
    with pytest.raises(BadEntry, match="claimed size"):
        decode_entry({**good, b"d": (2**31).to_bytes(4, "little") + good[b"d"][4:]}, max_plies=64)
    with pytest.raises(BadEntry, match="schema"):
        decode_entry({**good, b"s": b"1"}, max_plies=64)  # whole games only: the old format
    with pytest.raises(BadEntry, match="missing"):
        decode_entry({k: v for k, v in good.items() if k != b"w"}, max_plies=64)
    with pytest.raises(BadEntry, match="ply"):
        decode_entry(good, max_plies=10)  # plies reach 63 > max
    with pytest.raises(BadEntry):
        decode_entry(None, max_plies=64)  # type: ignore[arg-type]
    with pytest.raises(BadEntry):
        decode_entry({b"d": 1.5, b"w": b"x", b"v": b"1", b"n": b"1", b"s": b"1"}, max_plies=64)


def test_log_prob_rounding_tolerated(make_batch):
    b = make_batch(100, max_plies=64, seed=9)
    b.log_prob[0] = 1e-7  # float32 log-softmax of a forced move: just above 0, within LOG_PROB_TOLERANCE
    back = decode_entry(as_wire(encode_batch(b)), max_plies=64)
    assert back.num_positions == b.num_positions and np.array_equal(back.log_prob, b.log_prob)  # accepted, unchanged
    b.log_prob[0] = 10 * codec.LOG_PROB_TOLERANCE  # past the tolerance: refused
    with pytest.raises(BadEntry, match="log_prob"):
        decode_entry(as_wire(encode_batch(b)), max_plies=64)


def test_fuzz_never_crashes(make_batch):
    """Random byte flips anywhere in the decompressed payload and in the fields: BadEntry or OK."""
    b = make_batch(150, max_plies=64, seed=10)
    good = as_wire(encode_batch(b))
    raw = lz4.block.decompress(good[b"d"])
    rng = np.random.default_rng(0)
    outcomes = {"bad": 0, "ok": 0}
    for _ in range(600):
        mutated = bytearray(raw)
        for _ in range(int(rng.integers(1, 4))):
            mutated[int(rng.integers(len(mutated)))] = int(rng.integers(256))
        fields = {**good, b"d": lz4.block.compress(bytes(mutated), store_size=True)}
        try:
            decode_entry(fields, max_plies=64)
            outcomes["ok"] += 1
        except BadEntry:
            outcomes["bad"] += 1
    assert outcomes["bad"] > 300


def test_hcp_validator_matches_cshogi(make_batch):
    b = make_batch(500, max_plies=256, seed=11)
    assert replay.validate_hcp(b.hcp).all()
    rand = np.random.default_rng(0).integers(0, 256, (5000, 32), dtype=np.uint8)
    assert not replay.validate_hcp(rand).any()
    # unchecked mode still refuses positions cshogi cannot load safely
    payload = msgpack.unpackb(lz4.block.decompress(as_wire(encode_batch(b))[b"d"]), raw=False)
    payload["hcp"] = rand[: b.num_positions].tobytes()
    fields = {**as_wire(encode_batch(b)), b"d": lz4.block.compress(msgpack.packb(payload), store_size=True)}
    with pytest.raises(BadEntry, match="hcp"):
        decode_entry(fields, max_plies=256, check_legal=False)


def test_concat_batches(make_batch):
    a, b = make_batch(100, seed=12), make_batch(100, seed=13)
    c = concat_batches([a, b])
    assert c.num_positions == a.num_positions + b.num_positions and c.num_segments == a.num_segments + b.num_segments
    assert c.segment_offsets[a.num_segments] == a.num_positions
    decode_entry(as_wire(encode_batch(c)), max_plies=64)


def _golden_batch():
    """A fixed batch of 37 positions in 3 segments, the last one cut (synthetic values: encoding
    does not validate)."""
    p = 37
    i = np.arange(p)
    return ExperienceBatch(
        batch_id="golden:s:0", worker_id="golden",
        hcp=(np.arange(p * 32) * 7 % 251).astype(np.uint8).reshape(p, 32),
        ply=np.concatenate([np.arange(10), np.arange(15), 3 + np.arange(12)]).astype(np.uint16),
        repetition=(i % 3).astype(np.uint8),
        action=(i * 389 % 13527).astype(np.uint16),
        log_prob=(-0.125 * i).astype(np.float32),
        value=np.linspace(-1, 1, p).astype(np.float32),
        version=(5 + i // 10).astype(np.uint32),
        segment_offsets=np.array([0, 10, 25, 37], np.uint32),
        result=np.array([1, -1, 0], np.int8),
        reason=np.array([1, 3, 0], np.uint8),
        bootstrap=np.array([0.0, 0.0, -0.375], np.float32),
        bootstrap_advantage=np.array([0.0, 0.0, 0.0625], np.float32),
        game=np.array([7 << 32, (7 << 32) + 1, (7 << 32) + 2], np.uint64),
    )


def test_golden_wire_bytes():
    """The wire bytes of a fixed batch never change. These digests were computed for schema 3
    (segments with a bootstrap advantage) when it was introduced; a schema change needs a new
    ``SCHEMA_VERSION``, not a new digest (schemas 1 and 2 had their own digests until then)."""
    f = encode_batch(_golden_batch())
    assert {k: v for k, v in f.items() if k != "d"} == {"w": "golden", "v": 8, "n": 37, "s": 3}
    assert len(f["d"]) == 919
    assert hashlib.sha256(f["d"]).hexdigest() == "0cb37e5a9b8698e2996f251c78ae536719d3521db04057addb15298306ebc508"
    raw = lz4.block.decompress(f["d"])
    assert hashlib.sha256(raw).hexdigest() == "1d2856a42bf9f002373088247962f66f329f600b56514cd469194debc402eb90"


def test_schema_columns():
    assert schema.BYTES_PER_POSITION == 49 and schema.BYTES_PER_SEGMENT == 22
    assert list(schema.COLUMNS) == [*schema.POSITION.names, "segment_offsets", *schema.SEGMENT.names]
    assert [c.dtype.str for c in schema.COLUMNS.values()] == ["|u1", "<u2", "|u1", "<u2", "<f4", "<f4", "<u4",
                                                              "<u4", "|i1", "|u1", "<f4", "<f4", "<u8"]
    buffers = schema.zeros(schema.POSITION, (4, 6))
    assert buffers["hcp"].shape == (4, 6, 32) and buffers["log_prob"].dtype == np.float32
    b = _golden_batch()
    columns = b.columns()
    del columns["value"]
    with pytest.raises(TypeError, match=r"missing \['value'\]"):
        ExperienceBatch("x", "y", **columns)
    with pytest.raises(TypeError, match=r"unknown \['extra'\]"):
        ExperienceBatch("x", "y", **b.columns(), extra=np.zeros(1))
