"""Where edge_sel keeps fetched models and cached bundles: ``$EDGE_SEL_HOME`` or ``$XDG_CACHE_HOME/edge_sel``."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError


def home() -> Path:
    """The home folder, created on first use; a setting that cannot be a folder is an :class:`InputError`."""
    env = os.environ.get("EDGE_SEL_HOME")
    if env:
        root, setting = Path(env).expanduser(), f"EDGE_SEL_HOME={env}"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root, setting = Path(xdg) / "edge_sel", f"the cache folder {Path(xdg) / 'edge_sel'}"
    if root.exists() and not root.is_dir():
        raise InputError(f"{setting} cannot be used as edge_sel's home folder: it is a file")
    if not root.is_dir():
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{setting} cannot be used as edge_sel's home folder: {e.strerror}") from None
    return root


def models_dir() -> Path:
    return home() / "models"


def bundles_dir() -> Path:
    return home() / "bundles"


def data_dir() -> Path:
    return home() / "data"
