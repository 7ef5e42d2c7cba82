"""The USI engine's options: their ``option`` lines for ``usi``, the checks of ``setoption``
values (:class:`UsiOption`, the table :data:`OPTIONS`) and the ``setoption`` command
(:func:`set_option`). Nothing here imports torch until a ``Device`` value is checked, so ``usi``
is answered at once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

#: simulations per move when ``go`` gives no limit (the issue's 800 nodes/move)
DEFAULT_NODES = 800
DEFAULT_BATCH_SIZE = 16
DEFAULT_BYOYOMI_MARGIN_MS = 300
DEFAULT_MATE_SEARCH_PLIES = 5
DEFAULT_INFO_INTERVAL_MS = 1000


def _check_device(text: str) -> str:
    import torch

    from keisei_stream.rl.model import pick_device

    dev = pick_device(text)  # ValueError for unknown names and CUDA without CUDA
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"no device {text} ({torch.cuda.device_count()} CUDA device(s))")
    return text


def _check_temperature(text: str) -> float:
    t = float(text)
    if not math.isfinite(t) or t < 0 or t > 100:
        raise ValueError("must be a number in [0, 100]")
    return t


@dataclass
class UsiOption:
    """One USI option: ``kind`` is ``spin``, ``check`` or ``string``; ``parse`` turns a valid
    ``setoption`` value into the engine's value and raises ValueError (with the reason) otherwise."""

    name: str
    kind: str
    default: Any
    lo: Optional[int] = None
    hi: Optional[int] = None
    check: Optional[Callable[[str], Any]] = None
    doc: str = ""

    def line(self, value: Any) -> str:
        """The ``option name ... type ... default ...`` line, with ``value`` as the default."""
        if self.kind == "spin":
            return f"option name {self.name} type spin default {value} min {self.lo} max {self.hi}"
        if self.kind == "check":
            return f"option name {self.name} type check default {'true' if value else 'false'}"
        return f"option name {self.name} type string default {value}"

    def parse(self, text: str) -> Any:
        """The option's value for the ``setoption`` text ``text``.

        Raises:
            ValueError: not an integer in range (spin), not true/false (check), empty, or
                rejected by ``check`` (string).
        """
        text = text.strip()
        if self.kind == "spin":
            try:
                v = int(text)
            except ValueError:
                raise ValueError("not an integer") from None
            if not self.lo <= v <= self.hi:
                raise ValueError(f"out of range [{self.lo}, {self.hi}]")
            return v
        if self.kind == "check":
            if text.lower() not in ("true", "false"):
                raise ValueError("must be true or false")
            return text.lower() == "true"
        if not text:
            raise ValueError("empty")
        return self.check(text) if self.check else text

    def show(self, value: Any) -> str:
        """``value`` as the protocol writes it."""
        if self.kind == "check":
            return "true" if value else "false"
        return str(value)


#: The engine's options (name, type, default, range); ``keisei usi`` arguments change some defaults.
OPTIONS: list[UsiOption] = [
    UsiOption("Nodes", "spin", DEFAULT_NODES, 0, 100_000_000,
              doc="simulations per move when go gives no limit; 0 = no search: one forward pass per move"),
    UsiOption("BatchSize", "spin", DEFAULT_BATCH_SIZE, 1, 1024, doc="leaves per forward pass"),
    UsiOption("Threads", "spin", 1, 1, max(256, os.cpu_count() or 1), doc="torch intra-op threads"),
    UsiOption("Device", "string", "cpu", check=_check_device, doc="cpu | cuda | cuda:N | auto"),
    UsiOption("USI_Ponder", "check", False, doc="the GUI may send go ponder (always accepted)"),
    UsiOption("USI_Hash", "spin", 16, 1, 1_048_576, doc="accepted, no effect (the tree is bounded by visits)"),
    UsiOption("ByoyomiMargin", "spin", DEFAULT_BYOYOMI_MARGIN_MS, 0, 60_000,
              doc="ms kept back from the time that may be spent on a move"),
    UsiOption("MateSearchPlies", "spin", DEFAULT_MATE_SEARCH_PLIES, 0, 9,
              doc="root mate search depth (0 off, 1 mate in one, 3/5/7/9 cshogi's mate_move)"),
    UsiOption("InfoInterval", "spin", DEFAULT_INFO_INTERVAL_MS, 0, 3_600_000,
              doc="ms between info lines during a search (0: only the final one)"),
    UsiOption("Temperature", "string", "0", check=_check_temperature,
              doc="0 = best move; > 0 samples (raw policy: softmax(logits/T); search: visits^(1/T))"),
    UsiOption("Seed", "spin", 0, 0, 2_147_483_647, doc="seed of the sampling"),
    UsiOption("MaxMovesToDraw", "spin", 0, 0, 1_000_000,
              doc="the game's move limit: a draw once this many moves are played (counted from the game's "
              "start, the SFEN's move number included); 0 = no limit. YaneuraOu's option name"),
]
OPTION_BY_NAME = {o.name.lower(): o for o in OPTIONS}


def set_option(values: dict[str, Any], args: list[str]) -> Optional[str]:
    """``setoption name N [value V]`` (``args``: the words after ``setoption``; a name or value may
    hold spaces): the checked value of option N (case-insensitive) into ``values[N]``.

    Returns:
        None when set, else why not (the engine answers it in ``info string``; ``values`` is
        left as it was): no ``name``, an unknown option, or a bad value (:meth:`UsiOption.parse`).
    """
    if "name" not in args:
        return "setoption: expected 'setoption name NAME value VALUE'"
    i = args.index("name")
    if "value" in args[i + 1:]:
        j = args.index("value", i + 1)
        name, value = " ".join(args[i + 1:j]), " ".join(args[j + 1:])
    else:
        name, value = " ".join(args[i + 1:]), ""
    opt = OPTION_BY_NAME.get(name.lower())
    if opt is None:
        return f"unknown option {name!r}, ignored"
    try:
        parsed = opt.parse(value)
    except Exception as exc:  # ValueError from the checks; anything else is still a bad value
        return f"bad value {value!r} for option {opt.name}: {exc}; keeping {opt.show(values[opt.name])}"
    values[opt.name] = parsed
    return None
