"""Issue 13: a normal `alignforge run` prints progress bars, per-step lines and the result, and no
vLLM / Prefect WARNING lines (vLLM alone printed ~25 per run on a CPU box); `--verbose` shows them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Environment a user's shell would not have: the test session's own logging overrides.
NOT_A_USER_SETTING = ("PREFECT_LOGGING_LEVEL", "PREFECT_LOGGING_SERVER_LEVEL", "VLLM_LOGGING_LEVEL",
                      "VLLM_CONFIGURE_LOGGING", "ALIGNFORGE_QUIET", "PREFECT_LOGGING_LOGGERS_PREFECT_FLOW_RUNS_LEVEL",
                      "PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL", "TRANSFORMERS_VERBOSITY")


def test_quiet_environment_sets_vllm_and_prefect_to_error_before_import(monkeypatch):
    from flows import cli

    for name in NOT_A_USER_SETTING:
        monkeypatch.delenv(name, raising=False)
    cli.configure_environment(verbose=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["PREFECT_LOGGING_LEVEL"] == "ERROR"
    for name in NOT_A_USER_SETTING:
        monkeypatch.delenv(name, raising=False)
    cli.configure_environment(verbose=True)
    assert "VLLM_LOGGING_LEVEL" not in os.environ and os.environ["PREFECT_LOGGING_LEVEL"] == "INFO"


@pytest.mark.engine
@pytest.mark.timeout(1200)
def test_a_real_run_prints_no_warning_lines(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in NOT_A_USER_SETTING}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    cmd = [sys.executable, "-m", "flows.cli", "run", "magpie-sft", "--out", str(tmp_path / "run"),
           "--set", "n=2", "--set", "shard_size=2", "--set", "max_tokens_instruction=24",
           "--set", "max_tokens_response=24"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1100)
    output = done.stdout + done.stderr  # vLLM logs to stdout by default, Prefect to stderr
    assert done.returncode in (0, 2), output[-3000:]  # 2: nothing survived (2 rows): still a clean run
    warnings = [line for line in output.splitlines() if re.search(r"\bWARNING\b|Warning:", line)]
    assert not warnings, f"{len(warnings)} warning lines in a non-verbose run:\n" + "\n".join(warnings[:30])
    assert "magpie-sft: done" in done.stdout or "no row survived" in done.stderr, output[-3000:]
    assert "[magpie_instructions]" in done.stderr  # the per-step lines are still there
