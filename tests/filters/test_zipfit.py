import gzip
import zlib

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

import filters.zipfit as zipfit_module
from filters.zipfit import NOT_SELECTED, ZipFit, compressed_size, pair_sizes

CODE = [
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\nprint(add(10, 20))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i * i)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n        self.items.append(x)\n",
]
RECIPES = [
    "Whisk two eggs with sugar until pale, fold in the flour gently and bake for twenty minutes at 180C.",
    "Chop the onions finely, fry them in butter until golden, then pour in the stock and simmer slowly.",
    "Rinse the rice twice, cover with water, bring to the boil and leave it covered for fifteen minutes.",
]
TARGET = (
    "def mul(x, y):\n    return x * y\n\nprint(mul(4, 5))\n",
    "import os\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n",
    "class Queue:\n    def __init__(self):\n        self.items = []\n    def pop(self):\n        return self.items.pop(0)\n",
)


def direct_alignment(x: str, targets, level=6, container="zlib"):
    def c(b: bytes) -> int:
        return len(gzip.compress(b, level)) if container == "gzip" else len(zlib.compress(b, level))
    xb = x.encode()
    cx = c(xb)
    ncds = []
    for y in targets:
        yb = y.encode()
        cy = c(yb)
        ncds.append((c(xb + yb) - min(cx, cy)) / max(cx, cy))
    return 1 - sum(ncds) / len(ncds)


def frame(texts):
    return pl.DataFrame({"id": [f"r{i}" for i in range(len(texts))], "instruction": texts})


@pytest.mark.parametrize("compressor,level", [("zlib", 6), ("zlib", 1), ("gzip", 9)])
def test_scores_equal_the_formula(compressor, level):
    texts = CODE + RECIPES
    out = ZipFit(target_texts=TARGET, compressor=compressor, level=level, workers=1)(frame(texts))
    for text, score in zip(texts, out["zipfit_alignment"]):
        assert score == pytest.approx(direct_alignment(text, TARGET, level, compressor), abs=1e-9)


def test_pool_gives_the_same_scores_as_in_process():
    texts = [c + f"\n# variant {i}\n" for i in range(40) for c in CODE[:1]] + RECIPES * 1
    one = ZipFit(target_texts=TARGET * 300, workers=1)(frame(texts))["zipfit_alignment"]
    pooled_filter = ZipFit(target_texts=TARGET * 300, workers=2, chunk_size=7)
    pooled = pooled_filter(frame(texts))["zipfit_alignment"]
    pooled_filter.close()
    assert np.allclose(one.to_numpy(), pooled.to_numpy(), atol=1e-12)


def test_ranking_is_content_not_length():
    # Same-length texts of two domains: code must rank above recipes for a code target.
    code = [c[:60] for c in CODE]
    recipes = [r[:60] for r in RECIPES]
    assert {len(t) for t in code + recipes} == {60}
    out = ZipFit(target_texts=TARGET, top_k=3, workers=1).run(frame(code + recipes))
    assert out["keep"].to_list() == [True] * 3 + [False] * 3
    assert set(out.filter(~pl.col("keep"))["drop_reason"]) == {NOT_SELECTED}


def test_token_budget_and_min_alignment():
    texts = CODE + RECIPES
    f = ZipFit(target_texts=TARGET, workers=1)
    scored = f(frame(texts))
    words = [len(t.split(" ")) for t in texts]
    order = np.argsort(-scored["zipfit_alignment"].to_numpy(), kind="stable")
    budget = words[order[0]] + words[order[1]]
    g = ZipFit(target_texts=TARGET, workers=1, token_budget=budget)
    kept = g.mark(scored, g.select(scored))["keep"].to_numpy()
    assert set(np.flatnonzero(kept)) == {order[0], order[1]}
    cut = float(np.sort(scored["zipfit_alignment"].to_numpy())[3])
    h = ZipFit(target_texts=TARGET, workers=1, min_alignment=cut)
    assert h.mark(scored, h.select(scored))["keep"].sum() == 3


def test_level_zero_and_empty_target_are_clear_errors(tmp_path):
    with pytest.raises(ValidationError, match="length"):
        ZipFit(target_texts=TARGET, level=0)
    with pytest.raises(ValidationError, match="empty"):
        ZipFit(target_texts=())
    with pytest.raises(ValidationError, match="exactly one target"):
        ZipFit()
    empty = tmp_path / "t.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(Exception, match="no non-empty texts"):
        ZipFit(target=str(empty))(frame(CODE))


def test_target_from_file_and_score_key_by_content(tmp_path):
    path = tmp_path / "target.parquet"
    pl.DataFrame({"text": list(TARGET)}).write_parquet(path)
    from_file = ZipFit(target=str(path), workers=1)
    inline = ZipFit(target_texts=TARGET, workers=1)
    assert from_file.score_fingerprint("in") == inline.score_fingerprint("in")
    assert from_file(frame(CODE))["zipfit_alignment"].equals(inline(frame(CODE))["zipfit_alignment"])


def test_bad_rows_lz4_and_empty_dataset():
    texts = ["", None, "x" * 1_000_000, CODE[0]]
    out = ZipFit(target_texts=TARGET, compressor="lz4", workers=1, top_k=1).run(frame(texts))
    assert out["drop_reason"].to_list()[:2] == ["empty_text", "empty_text"]
    assert out["zipfit_alignment"].to_list()[:2] == [None, None]
    assert out["keep"].to_list()[2:] == [False, True]
    empty = pl.DataFrame({"id": [], "instruction": []}, schema={"id": pl.Utf8, "instruction": pl.Utf8})
    assert ZipFit(target_texts=TARGET, workers=1).run(empty).height == 0
    binary = pl.DataFrame({"id": ["a"], "instruction": [b"\xc3\x28"]}, schema={"id": pl.Utf8, "instruction": pl.Binary})
    assert ZipFit(target_texts=TARGET, workers=1).run(binary)["drop_reason"].to_list() == ["invalid_utf8"]
    assert compressed_size(b"", "lz4", 1) == 0


def _texts_for_priming(rng):
    """Empty, one byte, random bytes, low-entropy, code-like and 1 MB texts, plus lengths on
    both sides of every window-size boundary the primed compressor can pick."""
    code = "\n".join(CODE * 40).encode()
    texts = [b"", b"x", rng.bytes(3000), rng.bytes(20_000), bytes(rng.choice([97, 98], 5000).astype(np.uint8)),
             code[:1500], code, (CODE[0] * 20000).encode()[:1_000_000]]
    for wbits in range(9, 16):
        for edge in (2 ** wbits - 262 - 600, 2 ** wbits - 262 - 599, 2 ** wbits):
            if edge > 0:
                texts.append(code[:edge] if edge <= len(code) else (code * (edge // len(code) + 1))[:edge])
                texts.append(rng.bytes(edge))
    return texts


@pytest.mark.parametrize("compressor,level", [("zlib", 6), ("gzip", 6), ("zlib", 1), ("gzip", 9)])
def test_primed_pair_sizes_equal_compressing_the_concatenation(monkeypatch, compressor, level):
    rng = np.random.default_rng(0)
    texts = _texts_for_priming(rng)
    targets = [b"", b"y", rng.bytes(600), "\n".join(RECIPES).encode()[:599], TARGET[2].encode(),
               ("\n".join(TARGET) * 30).encode()]
    # Force the primed path for every source, short and empty ones included.
    monkeypatch.setattr(zipfit_module, "PRIME_MIN_SOURCE_BYTES", 0)

    def direct(data: bytes) -> int:
        return len(gzip.compress(data, level)) if compressor == "gzip" else len(zlib.compress(data, level))

    for x in texts:
        # x's own start as a target: a match exactly len(x) back, the farthest one possible,
        # which a window one size too small would miss.
        ys = targets + [x[:400]]
        got = pair_sizes(x, ys, compressor, level)
        assert got.tolist() == [direct(x + y) for y in ys], f"len(x)={len(x)}"
    # Right at each window limit: x + y just fits 2**wbits, the echo lies just beyond the
    # reach (2**wbits - 262) of that window, so only the next size up finds it.
    for wbits in range(9, 15):
        x = rng.bytes(2 ** wbits - 250)
        assert pair_sizes(x, [x[:200]], compressor, level).tolist() == [direct(x + x[:200])], wbits


def test_long_sources_score_exactly_the_formula():
    # Sources above PRIME_MIN_SOURCE_BYTES take the primed path inside the filter.
    long_texts = [(c * 30)[:4000] for c in CODE] + [(r + " ") * 40 for r in RECIPES]
    assert min(len(t) for t in long_texts) >= zipfit_module.PRIME_MIN_SOURCE_BYTES
    for compressor in ("zlib", "gzip"):
        out = ZipFit(target_texts=TARGET, compressor=compressor, workers=1)(frame(long_texts))
        for text, score in zip(long_texts, out["zipfit_alignment"]):
            assert score == pytest.approx(direct_alignment(text, TARGET, 6, compressor), abs=1e-9)


def test_sharegpt_target_goes_through_the_import_mapping(tmp_path):
    # Issue 8 kind 9: a ZIP-FIT target in ShareGPT layout, checked up front by load_target_texts.
    import json

    from filters.zipfit import load_target_texts
    from schemas import SchemaError

    path = tmp_path / "target.jsonl"
    rows = [{"conversations": [{"from": "human", "value": TARGET[0]}, {"from": "gpt", "value": TARGET[1]}]},
            {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": TARGET[2]}]},
            {"conversations": [{"from": "human", "value": "  "}, {"from": "gpt", "value": "x"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Conversation text = every turn joined by blank lines; a conversation without an answer is
    # still a target text; the row with an empty turn (quarantined on import) is not.
    assert load_target_texts(str(path)) == [f"{TARGET[0]}\n\n{TARGET[1]}", f"Be terse.\n\n{TARGET[2]}"]
    assert load_target_texts(str(path), on="instruction") == [TARGET[0], TARGET[2]]
    inline = ZipFit(target_texts=(f"{TARGET[0]}\n\n{TARGET[1]}", f"Be terse.\n\n{TARGET[2]}"), workers=1)
    assert ZipFit(target=str(path), workers=1)(frame(CODE))["zipfit_alignment"].equals(inline(frame(CODE))["zipfit_alignment"])
    # Alpaca layout with a number as output; a preference file gives prompt + chosen.
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Square it", "input": 12, "output": 144}]))
    assert load_target_texts(str(alpaca)) == ["Square it\n\n12\n\n144"]
    pref = tmp_path / "pref.jsonl"
    pref.write_text(json.dumps({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}) + "\n")
    assert load_target_texts(str(pref)) == ["Q?\n\nGood."]
    # Unusable targets fail at once, naming the file and the fix.
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(SchemaError, match=r"cannot find target texts in columns \['question', 'answer'\].*odd.jsonl.*Fix: give a 'text' column"):
        load_target_texts(str(odd))
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"conversations": [{"from": "narrator", "value": "x"}]}) + "\n")
    with pytest.raises(SchemaError, match=r"unknown role 'narrator'.*zipfit target.*column 'conversations'"):
        load_target_texts(str(broken))
    with pytest.raises(SchemaError, match="no such file"):
        load_target_texts(str(tmp_path / "missing.jsonl"))


def test_txt_target_splits_on_newline_only(tmp_path):
    from filters.zipfit import load_target_texts
    from schemas import SchemaError

    path = tmp_path / "t.txt"
    path.write_bytes("one\u2028still one\r\n\ntwo\n".encode("utf-8"))
    assert load_target_texts(str(path)) == ["one\u2028still one", "two"]
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(SchemaError, match="not valid UTF-8: byte 0xe9 at line 1"):
        load_target_texts(str(path))
    text_col = tmp_path / "t.jsonl"
    text_col.write_text('{"text": "a\u2028b"}\n{"text": 5}\n{"text": ""}\n')
    assert load_target_texts(str(text_col)) == ["a\u2028b", "5"]
