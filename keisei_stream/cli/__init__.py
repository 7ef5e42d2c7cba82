"""The ``keisei`` command: ``run``, ``status``, ``eval``, ``usi``, ``games``."""

from keisei_stream.cli.main import main

__all__ = ["main"]
