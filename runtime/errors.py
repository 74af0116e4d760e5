"""Errors that edge_sel raises for problems a user can fix.

The CLI prints these as one clear message and exits with code 2 (usage / input errors);
anything else is a bug: one line naming where its traceback went, exit code 1.
"""


class EdgeSelError(Exception):
    """Base class: a problem with the user's input, files or settings."""


class BundleError(EdgeSelError):
    """A bundle is missing, corrupt, tampered with or from an unsupported format version."""


class BudgetError(EdgeSelError):
    """A memory budget cannot be met; the message names the minimum that would work."""

    def __init__(self, message: str, minimum_bytes: int | None = None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


class ModelNotFoundError(EdgeSelError):
    """A model source could not be resolved; the message says where we looked."""


class InputError(EdgeSelError):
    """Bad call arguments or bad documents / prompts."""
