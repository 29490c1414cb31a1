"""User-facing errors.

A :class:`UserError` is a mistake the user can fix (bad flag, missing files, unreachable network). The CLI
prints its message as one paragraph and exits with code 2, never with a traceback. Internal invariants use
``assert``; bugs surface as ordinary exceptions.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or environment; the message says what was wrong and how to fix it."""

    exit_code = 2
