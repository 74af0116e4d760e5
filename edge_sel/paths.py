"""Checks of the paths a user names on the command line, made before any work starts."""

from __future__ import annotations

import os
from pathlib import Path

from edge_sel.runtime.errors import InputError


def writable_dir(path: str | None, option: str) -> Path | None:
    """``path`` as an existing folder this process can write to, or an :class:`InputError` naming ``option``."""
    if path is None:
        return None
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{option} {p} does not exist; create it first")
    if not p.is_dir():
        raise InputError(f"{option} {p} is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise InputError(f"{option} {p} is not writable")
    return p


def creatable_path(path: str | os.PathLike, option: str) -> Path:
    """``path`` if it exists or could be created: its nearest existing ancestor must be a writable folder."""
    p = Path(path).expanduser()
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{option} {p} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"{option} {p} cannot be created: {ancestor} is not writable")
    return p
