"""The ``keisei`` command: ``run``, ``status``, ``eval``, ``usi``, ``games`` (parser and dispatch
in :mod:`keisei_stream.cli.main`, one module per command)."""

from keisei_stream.cli.main import main

__all__ = ["main"]
