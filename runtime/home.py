"""Where edge_sel keeps fetched models and cached bundles: ``$EDGE_SEL_HOME`` or ``$XDG_CACHE_HOME/edge_sel``."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    env = os.environ.get("EDGE_SEL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "edge_sel"


def models_dir() -> Path:
    return home() / "models"


def bundles_dir() -> Path:
    return home() / "bundles"


def data_dir() -> Path:
    return home() / "data"
