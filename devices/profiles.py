"""Device profiles: the packaged ones (``devices/profiles/*.json``, figures with cited sources) and the ones
``edge-sel devices probe`` measured and saved under ``$EDGE_SEL_HOME/devices``."""

from __future__ import annotations

import json
from pathlib import Path

from edge_sel.runtime.errors import InputError
from edge_sel.runtime.home import home

from .schema import validate

PACKAGED = Path(__file__).resolve().parent / "profiles"


def user_dir() -> Path:
    return home() / "devices"


def _files() -> dict[str, Path]:
    found = {p.stem: p for p in sorted(PACKAGED.glob("*.json"))}
    if user_dir().is_dir():
        found.update({p.stem: p for p in sorted(user_dir().glob("*.json"))})  # a probed profile wins over a packaged one
    return found


def names() -> list[str]:
    return sorted(_files())


def load(name: str) -> dict:
    """A profile by name (packaged or probed) or by the path of a JSON file; validated against the schema."""
    path = Path(name) if name.endswith(".json") else _files().get(name)
    if path is None:
        raise InputError(f"unknown device {name!r}; known: {', '.join(names())} (or a profile .json path; "
                         f"`edge-sel devices probe` measures this machine)")
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"device profile not found: {path}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read device profile {path}: {e}") from None
    try:
        validate(doc)
    except Exception as e:  # jsonschema.ValidationError: one line naming the field
        raise InputError(f"{path} is not a valid device profile: {getattr(e, 'message', e)}") from None
    return doc


def save(doc: dict, path: Path | None = None) -> Path:
    validate(doc)
    path = path or user_dir() / f"{doc['name']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        tmp.replace(path)  # atomic: a reader never sees half a profile
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing behind
    return path
