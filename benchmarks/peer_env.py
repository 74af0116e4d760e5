"""The kvpress peer's own virtual environment (kvpress 0.5.5 needs transformers 5.x, edge_sel's export
side pins transformers 4.57.6, so the two cannot share one environment).

``ensure_kvpress_env()`` creates ``$EDGE_SEL_HOME/venvs/kvpress-0.5.5/`` once and returns its python:

* ``python -m venv --system-site-packages`` so torch 2.13.0 (already installed beside edge_sel) is
  reused instead of downloaded again; on a clean machine the pinned ``torch==2.13.0`` in the same pip
  command installs it (with the machine's CPU wheel when pip's configuration points at one);
* ``pip install kvpress==0.5.5 transformers==5.2.0 torch==2.13.0`` inside it (torch pinned in the same
  command, so the resolver can never swap it for another build);
* a check run by the venv's own python: ``torch.__version__`` is 2.13.0, transformers is 5.x, kvpress
  imports and has the presses the benchmark uses;
* a marker file written last (``edge_sel_env.json``): a directory without it is a half-built
  environment and is rebuilt; a file lock keeps two benchmarks from building it at once.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

KVPRESS_VERSION = "0.5.5"
TRANSFORMERS_VERSION = "5.2.0"
TORCH_VERSION = "2.13.0"
PRESSES = ("StreamingLLMPress", "SnapKVPress", "KnormPress", "ExpectedAttentionPress", "TOVAPress")
MARKER = "edge_sel_env.json"

CHECK = r"""
import json, torch, transformers, kvpress
missing = [p for p in %r if not hasattr(kvpress, p)]
print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                  "kvpress": getattr(kvpress, "__version__", None), "missing": missing}))
""" % (PRESSES,)


class PeerEnvError(RuntimeError):
    pass


def requirements() -> list[str]:
    return [f"kvpress=={KVPRESS_VERSION}", f"transformers=={TRANSFORMERS_VERSION}", f"torch=={TORCH_VERSION}"]


def env_dir(root: Path | None = None) -> Path:
    from edge_sel.runtime.home import home

    return (root or home() / "venvs") / f"kvpress-{KVPRESS_VERSION}"


def python_of(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def check_versions(info: dict) -> list[str]:
    """Problems with what the venv's python reported (empty = usable)."""
    bad = []
    if str(info.get("torch", "")).split("+")[0] != TORCH_VERSION:
        bad.append(f"torch is {info.get('torch')}, expected {TORCH_VERSION}")
    if not str(info.get("transformers", "")).startswith("5."):
        bad.append(f"transformers is {info.get('transformers')}, expected 5.x ({TRANSFORMERS_VERSION})")
    if info.get("missing"):
        bad.append(f"kvpress lacks {', '.join(info['missing'])}")
    return bad


def _probe(py: Path) -> dict:
    r = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True)
    if r.returncode != 0:
        raise PeerEnvError(f"the kvpress venv's python ({py}) cannot import torch/transformers/kvpress:\n{r.stderr[-1500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ensure_kvpress_env(root: Path | None = None, log=print, python: str | None = None) -> Path:
    """The kvpress venv's python executable, building the venv on first use (takes a few minutes)."""
    venv = env_dir(root)
    py = python_of(venv)
    marker = venv / MARKER
    if marker.is_file() and py.exists():
        return py
    venv.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another benchmark may be building it right now
        if marker.is_file() and py.exists():
            return py
        if venv.exists():
            log(f"removing a half-built kvpress environment at {venv}")
            shutil.rmtree(venv)
        log(f"creating the kvpress peer environment {venv} (first run only; pip install {' '.join(requirements())})")
        r = subprocess.run([python or sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise PeerEnvError(f"python -m venv {venv} failed:\n{r.stderr[-1500:]}")
        cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *requirements()]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            raise PeerEnvError(f"installing the kvpress peer failed ({' '.join(cmd)}), exit {r.returncode}:\n"
                               f"{(r.stderr or r.stdout)[-3000:]}\nThe kvpress peers need the package index "
                               f"(or a wheel cache) to reach kvpress {KVPRESS_VERSION} and transformers {TRANSFORMERS_VERSION}.")
        info = _probe(py)
        bad = check_versions(info)
        if bad:
            shutil.rmtree(venv, ignore_errors=True)
            raise PeerEnvError(f"the kvpress environment at {venv} is unusable: {'; '.join(bad)}")
        info["requirements"] = requirements()
        marker.write_text(json.dumps(info))  # last: marks the environment complete
        log(f"kvpress environment ready: torch {info['torch']}, transformers {info['transformers']}")
    return py


def env_info(py: Path) -> dict:
    m = py.parent.parent / MARKER
    return json.loads(m.read_text()) if m.is_file() else {}


if __name__ == "__main__":
    print(ensure_kvpress_env())


# ---- the llama.cpp peer -------------------------------------------------------------------------------------------
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_CHECK = r"""
import json, llama_cpp
print(json.dumps({"llama_cpp_python": llama_cpp.__version__}))
"""


def llama_env_dir(root: Path | None = None) -> Path:
    from edge_sel.runtime.home import home

    return (root or home() / "venvs") / f"llama-cpp-python-{LLAMA_CPP_VERSION}"


def ensure_llama_env(root: Path | None = None, log=print, python: str | None = None) -> Path:
    """The llama.cpp peer venv's python: ``llama-cpp-python`` compiled from the registry's source package (CPU, the
    vendored llama.cpp; 10-40 minutes on 2 cores, once), under the edge_sel home like the kvpress venv. A venv whose
    marker is missing but whose package imports at the pinned version (a build finished by hand) is adopted."""
    venv = llama_env_dir(root)
    py = python_of(venv)
    marker = venv / MARKER

    def probe() -> dict | None:
        r = subprocess.run([str(py), "-c", LLAMA_CHECK], capture_output=True, text=True)
        if r.returncode != 0:
            return None
        info = json.loads(r.stdout.strip().splitlines()[-1])
        return info if info.get("llama_cpp_python") == LLAMA_CPP_VERSION else None

    if marker.is_file() and py.exists():
        return py
    venv.parent.mkdir(parents=True, exist_ok=True)
    import fcntl

    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and py.exists():
            return py
        info = probe() if py.exists() else None
        if info is None:
            if venv.exists():
                log(f"removing a half-built llama.cpp environment at {venv}")
                shutil.rmtree(venv)
            log(f"building the llama.cpp peer {venv} (first run only: compiles llama-cpp-python=={LLAMA_CPP_VERSION})")
            r = subprocess.run([python or sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
            if r.returncode != 0:
                raise PeerEnvError(f"python -m venv {venv} failed:\n{r.stderr[-1500:]}")
            env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
            cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", f"llama-cpp-python=={LLAMA_CPP_VERSION}"]
            r = subprocess.run(cmd, capture_output=True, text=True, env=env)
            info = probe() if r.returncode == 0 else None
            if info is None:
                shutil.rmtree(venv, ignore_errors=True)
                raise PeerEnvError(f"building the llama.cpp peer failed ({' '.join(cmd)}), exit {r.returncode}:\n"
                                   f"{(r.stderr or r.stdout)[-3000:]}")
        marker.write_text(json.dumps(info))  # last: marks the environment complete
        log(f"llama.cpp environment ready: llama-cpp-python {info['llama_cpp_python']}")
    return py
