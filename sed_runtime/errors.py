"""User-facing errors: every CLI turns these into one line and exit code 2, never a traceback."""

from __future__ import annotations


class SedUserError(Exception):
    """A problem with what the user asked for; the message names the problem and the fix in one line."""
