"""The one error base class. Every user-facing error says what went wrong, where, and the fix;
the CLI catches `AlignforgeError` and prints it as one line with exit code 2."""

from __future__ import annotations


class AlignforgeError(Exception):
    """Base of every error a user can act on (bad input, bad recipe, unusable model or folder).

    Subclasses keep their stdlib base too (SchemaError is a ValueError, StorageError an OSError)
    so callers that catch those keep working."""

    fix: str | None = None
