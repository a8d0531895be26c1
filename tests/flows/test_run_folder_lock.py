"""Two runs on one run folder (issue 16 kind 3): the second exits 2 naming the first one's pid,
and the first finishes with every shard (real processes, no model needed)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

REPO = Path(__file__).resolve().parents[2]


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(tmp_path):
    rows = [{"instruction": f"Explain item {i} of the list in a few words please", "response": f"Item {i} is fine."}
            for i in range(30000)]
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "shared"
    cmd = [sys.executable, "-m", "alignforge", "run", "curate", "--set", f"input={data}", "--set", "shard_size=500",
           "--out", str(out)]
    env = {**os.environ, "ALIGNFORGE_QUIET": "1", "PREFECT_HOME": str(tmp_path / "ph")}
    first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    lock = out / ".alignforge-run.lock"
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not lock.exists():
        time.sleep(0.05)
    assert first.poll() is None, first.communicate()[1][-2000:]
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second started; make the input bigger"
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"in use by pid {first.pid}" in second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    published = pl.read_parquet(out / "publish" / "data" / "*.parquet").height
    rejected = sum(pl.read_parquet(f).height for f in glob.glob(str(out / "publish" / "rejected" / "*.parquet")))
    assert published + rejected == len(rows)  # nothing lost to the refused run
