"""Every notebook under notebooks/ executes (jupytext -> nbclient, a real ipykernel) on small runs made
here, and what it computes is checked: a JSON cell appended to the executed notebook reports it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.py"))
MARK = "__NOTEBOOK_RESULT__"


def execute(name: str, env: dict[str, str], report: str) -> dict:
    """Runs notebooks/<name> with `env` set and returns the JSON printed by `report` (a code cell)."""
    jupytext = pytest.importorskip("jupytext")
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    nb = jupytext.read(REPO / "notebooks" / name)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({MARK!r} + _json.dumps({report}, "
                                              "default=str))"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel is a child process: it inherits these
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    for output in nb.cells[-1].outputs:
        if output.get("output_type") == "stream" and MARK in output.get("text", ""):
            return json.loads(output["text"].split(MARK, 1)[1])
    raise AssertionError(f"{name}: no result printed; outputs {nb.cells[-1].outputs}")


def test_every_notebook_is_covered_here():
    assert {p.name for p in NOTEBOOKS} == {"explore_run.py", "compare_methods.py"}


@pytest.mark.timeout(900)
def test_explore_run_on_a_curate_run(curate_run):
    out, result = curate_run
    got = execute("explore_run.py", {"ALIGNFORGE_RUN": str(out), "MPLBACKEND": "Agg"}, """{
        "steps": steps.to_dicts(), "drops_by_step": drops_by_step, "scores": scores,
        "score_summary": score_summary.to_dicts(), "lengths": lengths, "length_summary": length_summary.to_dicts(),
        "examples": {k: v.height for k, v in examples.items()}, "rows": rows.height}""")
    steps = {s["step"]: s for s in got["steps"]}
    assert list(steps) == ["input", "heuristics", "minhash", "zipfit", "publish"]
    dupes = result["dropped"]["minhash_duplicate"]
    assert 5 <= dupes <= 10  # of the 10 near duplicates made (MinHash is approximate)
    assert steps["zipfit"]["rows_in"] == 72 - 1 - dupes and steps["zipfit"]["kept"] == 40 == result["rows_kept"]
    assert steps["publish"]["kept"] == 40
    assert got["drops_by_step"] == {"heuristics": {"instruction_ends_with_colon": 1},
                                    "minhash": {"minhash_duplicate": dupes},
                                    "zipfit": {"zipfit_not_selected": 71 - dupes - 40}}
    # Every drop is a row: kept + dropped = rows in of the first step.
    assert got["rows"] == steps["input"]["rows_in"] == 72
    assert {"zipfit_alignment", "minhash_cluster_size", "heur_repeated_ngram_ratio"} <= set(got["scores"])
    assert not {"minhash_cluster", "zipfit_rank", "id"} & set(got["scores"])
    zipfit = next(s for s in got["score_summary"] if s["column"] == "zipfit_alignment")
    assert zipfit["kept_mean"] > zipfit["dropped_mean"]  # top-k by alignment: kept rows score higher
    assert got["lengths"] == ["instruction_chars", "response_chars"]
    assert {s["status"] for s in got["length_summary"]} == {"kept", "dropped"}
    assert got["examples"] == {"kept": 5, "zipfit_not_selected": 5, "minhash_duplicate": 5,  # 5 per reason
                               "instruction_ends_with_colon": 1}


@pytest.mark.timeout(900)
def test_compare_methods_on_a_curate_and_a_candidates_run(curate_run, candidates_run):
    curate, result = curate_run
    candidates, made = candidates_run
    distinct = next(s["rows_kept"] for s in made["steps"] if s["step"] == "exact_dedup")
    assert 2 <= distinct < 12  # the scripted engine repeats its 7 questions
    got = execute("compare_methods.py", {"ALIGNFORGE_RUNS": f"{curate}{os.pathsep}{candidates}",
                                         "MPLBACKEND": "Agg"}, """{
        "kept_share": kept_share.to_dicts(), "methods": methods.to_dicts(), "diversity": diversity.to_dicts(),
        "sets": {k: v.height for k, v in sets.items()}, "gains": gains.height, "skipped": skipped}""")
    share = {r["step"]: r["kept_share"] for r in got["kept_share"]}  # steps of the two runs differ
    assert share["zipfit"] == pytest.approx(40 / (71 - result["dropped"]["minhash_duplicate"]), abs=1e-4)
    assert share["exact_dedup"] == pytest.approx(distinct / 12, abs=1e-4) and share["best_of_n"] == 1.0
    methods = {r["method"]: r for r in got["methods"]}
    assert methods["best_of_n@1"]["rows"] == 3 * distinct and methods["best_of_n@1"]["kept_share"] == 1.0
    imported = next(r for m, r in methods.items() if m.startswith("import"))
    assert imported["rows"] == 72 and imported["kept"] == 40 and "mean_zipfit_alignment" in imported
    # One set of k=3 candidates per distinct instruction; the curate run has none.
    assert sorted(got["sets"].values()) == [0, distinct]
    (div,) = got["diversity"]
    assert div["method"] == "best_of_n@1" and div["sets"] == distinct and div["mean_candidates"] == 3.0
    assert 0.0 < div["mean_distinct2"] <= 1.0
    assert got["gains"] == 0 and "reward_gains" in got["skipped"]  # no reward step ran: skipped, said why
