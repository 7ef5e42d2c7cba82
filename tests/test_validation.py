"""Validation that follows the game (:mod:`keisei_stream.wire.replay`): each forged segment of issue
23 refused with its reason, endings judged over a game's segments, what cannot be proven without
unseen history neutralised (never refused when honest), and honest self-play never refused."""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

from keisei_stream.experience import ExperienceBatch, concat_batches, schema
from keisei_stream.rl.selfplay import SelfPlay, UniformPolicy, segments_to_batch
from keisei_stream.shogi import EndReason
from keisei_stream.wire.codec import decode_entry, encode_batch
from keisei_stream.wire.errors import BadEntry
from keisei_stream.wire.replay import GameBook
from helpers import scripted_game

#: A dragon checks the White king back and forth: the 13th move makes the 4th occurrence, Black
#: (the last mover) gave check on every move: perpetual check, Black loses.
PERPETUAL_SFEN = "4k4/9/9/9/9/9/9/9/+R3K4 b r2b4g4s4n4l18p 1"
PERPETUAL = ["9i9a"] + ["5a5b", "9a9b", "5b5a", "9b9a"] * 3
#: Both kings step out and back from the initial position: the 12th move is the 4th occurrence, a draw.
SHUFFLE = ["5i5h", "5a5b", "5h5i", "5b5a"] * 3


def wire(b: ExperienceBatch) -> dict:
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in encode_batch(b).items()}


def check(b: ExperienceBatch, games: GameBook | None = None, max_plies: int = 64, worker: str = "w0") -> ExperienceBatch:
    """Decode ``b`` as the consumer does (with ``games``: committed when accepted)."""
    out = decode_entry(wire(b), max_plies=max_plies, worker=worker, games=games)
    if games is not None:
        games.commit()
    return out


def play(moves, sfen=None, ply0=0, max_plies=64, game=1):
    return scripted_game(moves, sfen, ply0, max_plies, game)


def split(b: ExperienceBatch, at: int) -> tuple[ExperienceBatch, ExperienceBatch]:
    """A one-segment batch cut into two segments of the same game: positions [0, at) (a cut) and
    the rest (with the original ending)."""
    def part(lo, hi, last):
        return ExperienceBatch(b.batch_id, b.worker_id, **{n: getattr(b, n)[lo:hi].copy() for n in schema.POSITION.names},
                               segment_offsets=np.array([0, hi - lo], np.uint32),
                               result=b.result.copy() if last else np.zeros(1, np.int8),
                               reason=b.reason.copy() if last else np.zeros(1, np.uint8),
                               bootstrap=np.zeros(1, np.float32), bootstrap_advantage=np.zeros(1, np.float32),
                               game=b.game.copy())
    return part(0, at, False), part(at, b.num_positions, True)


# ------------------------------------------------------------------------------------------ endings


def test_repetition_draw_across_segments_is_judged_over_the_game():
    whole = play(SHUFFLE)
    assert whole.reason[0] == EndReason.REPETITION_DRAW and whole.result[0] == 0
    for at in range(1, whole.num_positions):
        games = GameBook()
        first, second = split(whole, at)
        check(first, games)
        got = check(second, games)
        assert got.reason[0] == EndReason.REPETITION_DRAW, at  # proven with the first segment
        assert len(games) == 0  # the game ended: forgotten
        # the game's last segment recorded as a cut: the referee sees the 4th occurrence
        games = GameBook()
        check(first, games)
        cut = copy.deepcopy(second)
        cut.reason[:], cut.result[:] = 0, 0
        with pytest.raises(BadEntry, match="REPETITION"):
            check(cut, games)


def test_a_repetition_count_known_from_earlier_segments_must_be_exact():
    whole = play(SHUFFLE)
    first, second = split(whole, 6)
    games = GameBook()
    check(first, games)
    bad = copy.deepcopy(second)
    bad.repetition[:] = 2  # "counts of 2 on every position" (issue 23)
    with pytest.raises(BadEntry, match="repetition"):
        check(bad, games)
    bad = copy.deepcopy(second)
    bad.repetition[:] = 0  # lower than the game's history says
    with pytest.raises(BadEntry, match="repetition"):
        check(bad, games)


def test_perpetual_check_across_segments():
    whole = play(PERPETUAL, sfen=PERPETUAL_SFEN, ply0=2)
    assert whole.reason[0] == EndReason.PERPETUAL_CHECK and whole.result[0] == -1  # Black checked: Black loses
    assert check(whole).reason[0] == EndReason.PERPETUAL_CHECK  # proven inside the one segment
    for at in range(1, whole.num_positions):
        games = GameBook()
        first, second = split(whole, at)
        check(first, games)
        assert check(second, games).reason[0] == EndReason.PERPETUAL_CHECK, at
        forged = copy.deepcopy(second)
        forged.result[:] = 1  # the checking side wins: the rule says it loses
        games = GameBook()
        check(first, games)
        with pytest.raises(BadEntry, match="referee says PERPETUAL_CHECK result -1"):
            check(forged, games)


def test_perpetual_check_without_history_needs_the_check_and_is_not_believed():
    """The last segment alone (a restarted learner): the 4th occurrence is not provable, so the
    honest ending is trained as a cut valued 0 (counted); the one forged with the wrong sign is
    refused for the check it implies."""
    whole = play(PERPETUAL, sfen=PERPETUAL_SFEN, ply0=2)
    _first, second = split(whole, 6)
    games = GameBook()
    got = check(second, games)
    assert got.reason[0] == EndReason.NONE and got.result[0] == 0 and got.bootstrap[0] == 0
    assert games.counts["w0"]["unproven_endings"] == 1 and games.counts["w0"]["unknown"] == 1
    forged = copy.deepcopy(second)
    forged.result[:] = 1  # "won by the checker's victim"? the last mover won: it must have been in check
    with pytest.raises(BadEntry, match="not in check"):
        check(forged)


def test_a_cut_segment_relabelled_perpetual_check_is_refused_or_not_believed(make_batch):
    """Issue 23: an honest cut segment relabelled "perpetual check, mover +1" (or -1). With the
    game's history known it is refused; without it, it is refused for the check it implies or, if
    the position happens to have that check, trained as a cut valued 0: never as +1 or -1."""
    b = make_batch(3000, max_plies=256, seed=3, num_games=16, segment_plies=32, lookahead_plies=8)
    games = GameBook()
    check(b, games, max_plies=256)  # the whole batch: every game known from ply 0
    cuts = [g for g in np.flatnonzero(~b.ended) if b.ply[b.segment_offsets[g]] > 0][:20]
    assert cuts
    for g in cuts:
        s, e = int(b.segment_offsets[g]), int(b.segment_offsets[g + 1])
        seg = ExperienceBatch(b.batch_id, b.worker_id, **{n: getattr(b, n)[s:e].copy() for n in schema.POSITION.names},
                              segment_offsets=np.array([0, e - s], np.uint32),
                              **{n: getattr(b, n)[g:g + 1].copy() for n in schema.SEGMENT.names})
        mover = 1 - 2 * int(seg.hcp[-1, 0] & 1)  # +1 Black moved last
        for score in (1, -1):
            forged = copy.deepcopy(seg)
            forged.reason[:], forged.result[:] = EndReason.PERPETUAL_CHECK, score * mover
            forged.bootstrap[:], forged.bootstrap_advantage[:] = 0, 0
            # the segment's predecessor is known to this book (the whole batch): but the segment
            # itself was already read; a fresh book that saw the predecessors only
            known = GameBook()
            prior = [h for h in range(g) if b.game[h] == b.game[g]]
            for h in prior:
                hs, he = int(b.segment_offsets[h]), int(b.segment_offsets[h + 1])
                check(ExperienceBatch(b.batch_id, b.worker_id,
                                      **{n: getattr(b, n)[hs:he].copy() for n in schema.POSITION.names},
                                      segment_offsets=np.array([0, he - hs], np.uint32),
                                      **{n: getattr(b, n)[h:h + 1].copy() for n in schema.SEGMENT.names}), known, max_plies=256)
            with pytest.raises(BadEntry, match="referee says NONE"):
                check(forged, known, max_plies=256)
            try:
                got = check(forged, max_plies=256)  # no history
            except BadEntry as exc:
                assert "check" in exc.reason
            else:
                assert got.reason[0] == EndReason.NONE and got.result[0] == 0 and got.bootstrap[0] == 0


def test_forged_segments_of_issue_23_are_refused_with_their_reason(make_batch):
    b = make_batch(600, max_plies=64, seed=21, segment_plies=8, lookahead_plies=4)
    cut = int(np.flatnonzero(~b.ended)[0])
    forged = copy.deepcopy(b)
    forged.bootstrap[cut], forged.bootstrap_advantage[cut] = 1.0, 2.0  # each in range, their sum -2.87 later
    with pytest.raises(BadEntry, match="bootstrap \\+ bootstrap_advantage"):
        check(forged)
    forged = copy.deepcopy(b)
    forged.ply += 1  # "+1 on every ply": a ply-0 segment no longer looks like a game's start
    with pytest.raises(BadEntry, match="to move at ply"):
        check(forged, max_plies=66)
    forged = copy.deepcopy(b)
    forged.ply += 2  # the sides still fit: the first segments no longer start at ply 0, so a
    forged.reason[forged.reason == EndReason.MAX_PLIES] = 0  # (and no game reaches max_plies)
    check(forged, max_plies=70)  # restarted learner's view: accepted, nothing claimed that needs the history
    with pytest.raises(BadEntry, match="field w"):
        check(b, worker="w1")  # an entry naming w0 on w1's stream
    stolen = copy.deepcopy(b)
    stolen.worker_id = "w1"  # named right, but with a batch id of w0's
    with pytest.raises(BadEntry, match="batch_id"):
        decode_entry(wire(stolen), max_plies=64, worker="w1")


def test_segments_must_continue_their_game(make_batch):
    b = make_batch(600, max_plies=64, seed=21, segment_plies=8, lookahead_plies=4)
    games = GameBook()
    first_of = {}
    for g in range(b.num_segments):
        first_of.setdefault(int(b.game[g]), g)
    # the batch's segments in order: each game's later segments continue its earlier ones
    check(b, games)
    assert sum(c["continued"] for c in games.counts.values()) > 0
    # a segment claiming to continue a game from another position of the same ply
    games = GameBook()
    g0 = next(g for g in range(b.num_segments) if not b.ended[g] and b.ply[b.segment_offsets[g]] == 0)
    s, e = int(b.segment_offsets[g0]), int(b.segment_offsets[g0 + 1])
    seg = ExperienceBatch(b.batch_id, b.worker_id, **{n: getattr(b, n)[s:e].copy() for n in schema.POSITION.names},
                          segment_offsets=np.array([0, e - s], np.uint32),
                          **{n: getattr(b, n)[g0:g0 + 1].copy() for n in schema.SEGMENT.names})
    check(seg, games)
    nxt = next(g for g in range(g0 + 1, b.num_segments) if b.game[g] == b.game[g0])
    other = next(g for g in range(b.num_segments) if b.game[g] != b.game[g0]
                 and b.ply[b.segment_offsets[g]] == b.ply[b.segment_offsets[nxt]])
    s, e = int(b.segment_offsets[other]), int(b.segment_offsets[other + 1])
    forged = ExperienceBatch(b.batch_id, b.worker_id, **{n: getattr(b, n)[s:e].copy() for n in schema.POSITION.names},
                             segment_offsets=np.array([0, e - s], np.uint32),
                             **{n: getattr(b, n)[other:other + 1].copy() for n in schema.SEGMENT.names})
    forged.game[:] = b.game[g0]
    with pytest.raises(BadEntry, match="does not continue game"):
        check(forged, games)
    # a game's ply 0 away from the initial position
    later = next(g for g in range(b.num_segments) if b.ply[b.segment_offsets[g]] == 8 and not b.ended[g])
    bad = ExperienceBatch(b.batch_id, b.worker_id,
                          **{n: getattr(b, n)[int(b.segment_offsets[later]):int(b.segment_offsets[later + 1])].copy()
                             for n in schema.POSITION.names},
                          segment_offsets=np.array([0, int(np.diff(b.segment_offsets)[later])], np.uint32),
                          **{n: getattr(b, n)[later:later + 1].copy() for n in schema.SEGMENT.names})
    bad.ply -= 8  # a later segment of a game passed off as a game's first
    with pytest.raises(BadEntry, match="initial position"):
        check(bad)


def test_repetition_counts_without_history_are_lowered_not_refused():
    b = play(SHUFFLE[:10])  # not ended: a cut after 10 plies
    _first, second = split(b, 5)  # plies 5..9: a restarted learner's first look at the game
    honest = copy.deepcopy(second)
    inflated = copy.deepcopy(second)
    inflated.repetition[:] = 2
    games = GameBook()
    got = check(inflated, games)
    assert np.array_equal(got.repetition, np.minimum(honest.repetition, got.repetition))
    assert (got.repetition <= 2).all() and games.counts["w0"]["repetition_clamped"] > 0


# ------------------------------------------------------------------------------------------ honest play


def _worker_batches(positions: int, games: int, max_plies: int, segment_plies: int, lookahead: int,
                    batch_positions: int, seed: int) -> list[ExperienceBatch]:
    """Entries as a worker sends them: self-play cut into segments, batched in order."""
    sp = SelfPlay(UniformPolicy(seed), games=games, max_plies=max_plies, segment_plies=segment_plies,
                  lookahead_plies=lookahead, gamma=0.995, lam=0.98, temperature=1.0, seed=seed)
    outbox, out, total = [], [], 0
    while total < positions:
        outbox += sp.step(1).segments
        n = 0
        k = 0
        while k < len(outbox) and n < batch_positions:
            n, k = n + outbox[k].num_positions, k + 1
        if n >= batch_positions:
            b = segments_to_batch(outbox[:k])
            b.worker_id, b.batch_id = "w0", f"w0:s:{len(out)}"
            out.append(b)
            outbox, total = outbox[k:], total + n
    outbox += sp.flush()
    b = segments_to_batch(outbox)
    b.worker_id, b.batch_id = "w0", f"w0:s:{len(out)}"
    return out + [b]


@pytest.mark.parametrize("settings", [
    dict(games=64, max_plies=512, segment_plies=32, lookahead=32, batch_positions=1024),  # quickstart
    dict(games=8, max_plies=64, segment_plies=32, lookahead=32, batch_positions=64),  # tiny
    dict(games=16, max_plies=256, segment_plies=8, lookahead=4, batch_positions=100),
])
def test_honest_self_play_is_never_refused(settings):
    """Real self-play (look-ahead, segments, the flush at a stop), as a worker sends it: every entry
    accepted through one game book, each game followed from ply 0 (nothing neutralised)."""
    batches = _worker_batches(20_000, seed=5, **settings)
    games = GameBook()
    for b in batches:
        got = check(b, games, max_plies=settings["max_plies"])
        assert np.array_equal(got.reason, b.reason) and np.array_equal(got.repetition, b.repetition)
    counts = games.counts.get("w0", Counter())
    assert (counts["continued"] > 0) == (settings["max_plies"] > settings["segment_plies"] + settings["lookahead"])
    assert counts["unknown"] == 0 and counts["unproven_endings"] == 0
    assert counts["repetition_clamped"] == 0 and counts["gaps"] == 0
    # the same entries one by one without history (a restarted learner): never refused either
    for b in batches[len(batches) // 2:]:
        check(b, max_plies=settings["max_plies"])


def test_game_book_is_bounded_per_worker_flood():
    """A worker flooding the book forgets its own games first."""
    book = GameBook(max_positions=100)
    whole = play(SHUFFLE[:8])
    whole.reason[:], whole.result[:] = 0, 0
    for w, n in (("honest", 2), ("flood", 40)):
        for i in range(n):
            b = copy.deepcopy(whole)
            b.game[:] = i
            b.batch_id, b.worker_id = f"{w}:s:{i}", w
            check(b, book, worker=w)
    assert book.positions <= 100
    assert book.counts["flood"]["forgotten"] > 0 and "forgotten" not in book.counts.get("honest", {})
    assert book.get("honest", 0) is not None and book.get("honest", 1) is not None


def test_concatenated_segments_of_one_game_in_one_entry():
    whole = play(SHUFFLE)
    first, second = split(whole, 7)
    both = concat_batches([first, second])
    games = GameBook()
    assert check(both, games).reason[-1] == EndReason.REPETITION_DRAW
    assert games.counts["w0"]["continued"] == 1
