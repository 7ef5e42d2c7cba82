"""The one exception of the wire's validation: an entry that must not reach training."""

from __future__ import annotations


class BadEntry(ValueError):
    """A stream entry that must not reach training; ``reason`` says why (at most 300 characters).

    ``positions`` is the number of positions actually decoded from the entry before it was found
    bad (0 when its arrays could not be decoded): what the accounting counts, never the entry's
    own claim.
    """

    def __init__(self, reason: str, positions: int = 0):
        reason = str(reason)
        if len(reason) > 300:
            reason = reason[:297] + "..."
        super().__init__(reason)
        self.reason = reason
        self.positions = int(positions)


__all__ = ["BadEntry"]
