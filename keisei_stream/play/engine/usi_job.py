"""One ``go`` of the USI engine (:class:`SearchJob`): its search thread, and when its ``bestmove``
may be sent (the protocol's rules: :mod:`keisei_stream.play.engine.usi_server`, ``go``). The
states of a job's answer live here, in one place; the engine starts a job and passes it the
commands below.

- the search ends: its answer is sent, or *held* (``go ponder``, ``go infinite``: never answered
  before ``stop`` or ``ponderhit``), or dropped (*discarded*, below);
- ``ponderhit`` (a held ``go ponder``): the held answer is sent at once, or the search goes on
  under the ``go``'s clock counted from the ``ponderhit`` (its limits changed in place);
- ``stop``, ``quit``: the search stops; a held answer is sent (now, or when the search ends);
- ``gameover``, ``usinewgame``, end of input (``"finish"``): a search with limits runs on and
  answers; a held one stops and answers;
- a new ``go`` (``"replace"``): as ``"finish"``, but a held search is stopped and discarded,
  never answered (its move is for another position).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional

import cshogi

from keisei_stream.play.engine.protocol import GoParams
from keisei_stream.play.engine.tree import SearchLimits


@dataclass(eq=False)
class SearchJob:
    """One ``go``: what to search, its stop flag and limits, and its answer's state.

    Attributes:
        board: the position to search (the engine's copy); ply: plies since the game's start;
            repetition: earlier occurrences of the position (0..2).
        params: the parsed ``go``; t0: ``time.perf_counter()`` when ``go`` was read (the clock and
            the ``time`` of the ``info`` lines count from it).
        raw: one forward pass instead of a search (``Nodes 0``).
        send: writes one answer line (the engine's :meth:`~keisei_stream.play.engine.usi_server.UsiEngine.send`).
        hold: the answer waits for ``stop`` / ``ponderhit`` (``go ponder``, ``go infinite``).
        discard: never answer (a new ``go`` replaced a held search); the thread also stops
            writing ``info`` lines.
        answer: the ``bestmove`` line, kept while held.
        stop: stops the search when set.
        limits: the search's limits; the search reads them before every simulation, so
            :meth:`ponderhit` changes them in place while it runs.
    """

    board: cshogi.Board
    ply: int
    repetition: int
    params: GoParams
    t0: float
    raw: bool
    send: Callable[[str], None]
    hold: bool = field(init=False)
    discard: bool = field(default=False, init=False)
    answer: Optional[str] = field(default=None, init=False)
    stop: threading.Event = field(default_factory=threading.Event, init=False)
    limits: SearchLimits = field(default_factory=SearchLimits, init=False)
    thread: Optional[threading.Thread] = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.hold = self.params.ponder or self.params.infinite

    def start(self, think: Callable[[SearchJob], str]) -> None:
        """Run ``think(job)`` (the search, returning the ``bestmove`` line; it must not raise) in a
        daemon thread, then deliver its answer by the rules above."""
        self.thread = threading.Thread(target=lambda: self._deliver(think(self)), name="keisei-search", daemon=True)
        self.thread.start()

    def running(self) -> bool:
        """The search thread is alive."""
        return self.thread is not None and self.thread.is_alive()

    def ponderhit(self, limits: SearchLimits) -> None:
        """``ponderhit``: a held ``go ponder`` search now searches under ``limits`` (its clock
        counted from the ``ponderhit``), or answers at once when it has already ended. Anything
        else (no ponder, already stopped or discarded) is ignored."""
        if not self.params.ponder:
            return
        with self._lock:
            if not self.hold or self.discard:
                return
            self.hold = False
            if self.answer is not None:  # the search had already ended
                self.send(self.answer)
                self.answer = None
                return
            self.limits.nodes = limits.nodes
            self.limits.deadline = limits.deadline

    def end(self, how: Literal["stop", "finish", "replace"]) -> None:
        """End the search and wait for its thread.

        ``how``:

        - ``"stop"`` (``stop``, ``quit``): it stops after the batch in flight and its ``bestmove``
          is sent;
        - ``"finish"`` (``gameover``, ``usinewgame``, end of input): a search with limits runs to
          its limits and answers (commands piped in at once); a ponder/infinite search stops and
          answers;
        - ``"replace"`` (a ``go`` while a search runs): as ``"finish"``, except that a
          ponder/infinite search is stopped and discarded, never answered.
        """
        with self._lock:
            if self.hold:
                if how == "replace":
                    self.discard = True
                    self.answer = None
                else:
                    self.hold = False
                    if self.answer is not None:
                        self.send(self.answer)
                        self.answer = None
                self.stop.set()
            elif how == "stop":
                self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _deliver(self, answer: str) -> None:
        """The search's answer: sent, held, or dropped (discarded)."""
        with self._lock:
            if self.discard:
                return
            if self.hold:
                self.answer = answer
            else:
                self.send(answer)
