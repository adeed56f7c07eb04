"""User-facing errors: one line each, no traceback, a non-zero exit. The base and the kinds several stages raise are
here; an error only one module raises is defined there (``TemplateError`` in data.templates, ``EndpointError`` in
endpoint.client)."""

from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user: a config key, a data record, a path. Printed as one line (or one per problem)."""


class ConfigError(UserError):
    """A key of the command line, a recipe or a saved configuration."""


class DataError(UserError):
    """A data file, record or field."""


class ModelError(UserError):
    """A model that cannot be found or loaded."""


class AdapterError(UserError):
    """A saved adapter that is empty or learned nothing."""


class MergeError(UserError):
    """A merge that would be wrong or lose the adapter."""


class ExportError(UserError):
    """An export the converter cannot do, or that would not fit on the disk."""


@contextmanager
def exit_on_user_error(exit_code: int = 2):
    """Entry points wrap their work in this so bad input ends with clear lines, not a traceback."""
    try:
        yield
    except UserError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(exit_code) from None
