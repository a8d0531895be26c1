import numpy as np

from engines.embedder import DEFAULT_EMBEDDER, default_model_dir, get_embedder


def test_model_ships_in_the_wheel():
    assert (default_model_dir() / "model.safetensors").exists()


def test_embeddings_are_normalised_and_semantic():
    emb = get_embedder()
    assert emb is get_embedder() and emb.model_id == DEFAULT_EMBEDDER
    v = emb.embed(["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell sharply today.", ""])
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v[:3], axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > 0.8 > v[0] @ v[2]
    assert emb.embed([]).shape == (0, 384)
