"""User-facing errors: one line, no traceback, a non-zero exit."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: a config key, a data record, a path. Printed as one line."""


@contextmanager
def exit_on_user_error(exit_code: int = 2):
    """Entry points wrap their work in this so bad input ends with one clear line, not a traceback."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exit_code) from None
