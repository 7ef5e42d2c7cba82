"""What a search's root answers without a search (``SearchResult.shortcut`` says which), by the
rules of the game alone: no network, no tree.

In this order (:func:`answer_without_search`):

1. no legal move -> ``"resign"``; an entering-king declaration possible -> ``"win"`` (the USI
   declaration; both by the referee, :func:`root_shortcut`);
2. with ``mate_search_plies >= 1`` and the side to move not in check,
   ``board.mate_move_in_1ply()``, then for 3, 5, ... up to ``mate_search_plies``
   ``board.mate_move(ply)`` (cshogi's odd-ply mate search): a mate found is played at once
   (:func:`root_mate`, ``"mate"``);
3. as dlshogi does, a move is played at once when every legal move ends the game (each child
   would be a terminal node, :func:`keisei_stream.play.engine.tree.exact_value`: the referee's
   rules with ``draw_plies``, or a mate in one for the opponent): the move with the best exact
   value, the first of equals in cshogi's move order (``"every_move_ends_the_game"``);
4. or when it is the only legal one (``"one_legal_move"``, value NaN: not searched).
"""

from __future__ import annotations

import sys
from typing import Optional

import cshogi

from keisei_stream.play.engine.tree import SearchResult, exact_value
from keisei_stream.shogi import EndReason, judge


def root_shortcut(board: cshogi.Board, num_legal: int) -> Optional[str]:
    """What the side to move of a search's root answers without searching, by the referee's rules
    (:func:`keisei_stream.shogi.judge`, repetitions and the move limit left out: the game the root
    belongs to is going on): ``"resign"`` with no legal move (checkmate), ``"win"`` when it can
    declare entering king (the USI ``bestmove win``), else None."""
    verdict = judge(board, 1, 0, sys.maxsize, num_legal > 0)
    if verdict.reason == EndReason.CHECKMATE:
        return "resign"
    if verdict.reason == EndReason.ENTERING_KING:
        return "win"
    return None


def root_mate(board: cshogi.Board, plies_max: int) -> Optional[tuple[int, int]]:
    """cshogi's mate search at the root, up to ``plies_max`` plies (0: off): ``(move, plies)`` of a
    verified mate, else None (also when the side to move is in check). ``board`` is left as it was."""
    if plies_max < 1 or board.is_check():
        return None
    m = board.mate_move_in_1ply()
    if m and board.is_legal(m):
        board.push(m)
        mated = judge(board, 1, 0, 1 << 30).reason == EndReason.CHECKMATE
        board.pop()
        if mated:
            return int(m), 1
    for plies in range(3, plies_max + 1, 2):
        m = board.mate_move(plies)
        if m and board.is_legal(m):
            return int(m), plies
    return None


def root_exact_values(board: cshogi.Board, legal: list[int], counts: dict[int, int], ply: int,
                      draw_plies: int, leaf_mate_in_1: bool) -> list[float]:
    """Exact values for the side to move of the root's moves ``legal``, in that order, up to the
    first move after which the game goes on (not included): the moves whose child would be a
    terminal node (:func:`keisei_stream.play.engine.tree.exact_value`; ``counts``: the game's
    position counts, ``ply``: the root's). ``board`` is left as it was."""
    values = []
    for move in legal:
        board.push(move)
        try:
            occurrences = counts.get(board.zobrist_hash(), 0) + 1
            end = exact_value(board, len(board.legal_moves), occurrences, ply + 1, draw_plies, leaf_mate_in_1)
        finally:
            board.pop()
        if end is None:
            break
        values.append(-end[1])
    return values


def answer_without_search(board: cshogi.Board, ply: int, legal: list[int], counts: dict[int, int], *,
                          draw_plies: int, mate_search_plies: int,
                          leaf_mate_in_1: bool) -> Optional[SearchResult]:
    """The answer when the root needs no search (module docstring), else None.

    Args:
        board: the root position (left as it was); ``ply``: plies since the game's start.
        legal: its legal moves (cshogi codes, cshogi's order).
        counts: occurrences of each position of the game up to the root
            (:func:`keisei_stream.play.engine.tree.position_counts`).
        draw_plies, leaf_mate_in_1: the search's rules (:class:`keisei_stream.play.engine.mcts.MCTS`).
        mate_search_plies: the root mate search's depth (0: off).

    Returns:
        a :class:`SearchResult` with ``shortcut`` set (``nodes`` 0, ``elapsed`` not set), or None.
    """
    shortcut = root_shortcut(board, len(legal))
    if shortcut is not None:
        value = 1.0 if shortcut == "win" else -1.0
        return SearchResult(0, shortcut, value=value, root_value=value, shortcut=shortcut)
    mate = root_mate(board, mate_search_plies)
    if mate is not None:
        usi = cshogi.move_to_usi(mate[0])
        return SearchResult(mate[0], usi, value=1.0, root_value=1.0, pv=[usi], depth=1, seldepth=1,
                            mate_in=mate[1], shortcut="mate")
    exact = root_exact_values(board, legal, counts, ply, draw_plies, leaf_mate_in_1)
    if len(exact) == len(legal):  # every move ends the game: the best exact value
        i = max(range(len(exact)), key=exact.__getitem__)
        move, value, kind = legal[i], exact[i], "every_move_ends_the_game"
    elif len(legal) == 1:
        move, value, kind = legal[0], float("nan"), "one_legal_move"
    else:
        return None
    usi = cshogi.move_to_usi(move)
    return SearchResult(move, usi, value=value, root_value=value, pv=[usi], depth=1, shortcut=kind)
