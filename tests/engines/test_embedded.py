"""The embedded model folder: concurrent first-time preparation, and early errors for bad folders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines import embedded, get_engine
from engines.embedded import ModelError, check_model_folder

PREPARE = "from engines.embedded import prepare_embedded_model; print(prepare_embedded_model())"


def test_two_processes_preparing_at_once_both_succeed(tmp_path):
    env = {**os.environ, "ALIGNFORGE_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", PREPARE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    folder = Path(outs[0][0].strip().splitlines()[-1])
    assert folder == Path(outs[1][0].strip().splitlines()[-1]) == tmp_path / "cache" / "models" / embedded.EMBEDDED_MODEL_NAME
    assert embedded.is_prepared(folder)
    check_model_folder(folder)
    # No half-built temporary sibling is left behind.
    assert [p.name for p in folder.parent.iterdir() if p.is_dir()] == [embedded.EMBEDDED_MODEL_NAME]

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(int(logits.argmax())).strip() == "Paris"  # real weights, not noise


def test_check_model_folder_errors(tmp_path):
    with pytest.raises(ModelError, match="not a folder"):
        check_model_folder(tmp_path / "missing.bin")
    with pytest.raises(ModelError, match="no config.json.*Fix"):
        check_model_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelError, match="no weights.*Fix"):
        check_model_folder(tmp_path)


def test_corrupt_model_folder_fails_before_vllm_starts(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{not json")
    started = []
    import engines.vllm_engine as vllm_engine

    monkeypatch.setattr(vllm_engine.VLLMEngine, "__init__", lambda *a, **k: started.append(1))
    with pytest.raises(ModelError, match="not valid JSON.*Fix"):
        get_engine(str(tmp_path))
    assert not started
