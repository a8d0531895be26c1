import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from storage import RunLock, StorageError, check_run_folder
from storage.owner import HOST
from storage.run_folder import LOCK_NAME

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- check_run_folder

@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.mark.parametrize("out, message", [
    ("", r"the output folder is empty \(--out ''\)"),
    ("   ", r"the output folder is empty"),
    ("/", r"the output folder '/' is the filesystem root \(/\): alignforge would write /stages and /publish"),
    ("//", r"is the filesystem root"),
    ("/..", r"is the filesystem root"),
    ("file:///", r"is the filesystem root"),
    ("memory://", r"is the root of its filesystem / bucket"),
])
def test_empty_and_root_paths_are_refused(out, message, home):
    with pytest.raises(StorageError, match=message + r".*Fix: pass a folder of its own"):
        check_run_folder(out)


def test_the_home_folder_and_folders_above_it_are_refused(home, monkeypatch):
    monkeypatch.chdir(home)
    for out in ("~", str(home), ".", f"{home}/"):
        with pytest.raises(StorageError, match=r"is your home folder"):
            check_run_folder(out)
    with pytest.raises(StorageError, match=r"holds your home folder"):
        check_run_folder(str(home.parent))


def test_a_file_or_a_path_through_a_file_is_refused(tmp_path, home):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(StorageError, match=r"notes.txt.* is a file, not a folder.*Fix: remove that file"):
        check_run_folder(tmp_path / "notes.txt")
    with pytest.raises(StorageError, match=r"cannot be created: .*notes.txt is a file"):
        check_run_folder(tmp_path / "notes.txt" / "run")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_an_unwritable_parent_is_refused(tmp_path, home):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(StorageError, match=r"permission denied"):
            check_run_folder(locked / "run")
    finally:
        locked.chmod(0o700)


def test_a_new_folder_is_accepted_and_nothing_is_created(tmp_path, home, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_run_folder("runs/a/b/") == "runs/a/b"
    assert check_run_folder(tmp_path / "x") == str(tmp_path / "x")
    assert check_run_folder("~/runs/y") == str(home / "runs" / "y")
    assert check_run_folder("memory://bucket/run/") == "memory://bucket/run"
    assert sorted(os.listdir(tmp_path)) == ["home"] and os.listdir(home) == []


# ---------------------------------------------------------------- RunLock, one process

def test_lock_writes_who_holds_it_and_removes_it_on_exit(tmp_path):
    out = tmp_path / "run"
    with RunLock(out, command="alignforge run demo") as lock:
        info = json.loads((out / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == HOST and info["command"] == "alignforge run demo"
        assert info["started_at"] and lock.took_over is None
        assert RunLock.holder(out)["pid"] == os.getpid()
        with pytest.raises(StorageError, match=rf"run folder {out} is in use by pid {os.getpid()} .*"
                                               r"Fix: wait for that run to finish, or use another --out"):
            RunLock(out).acquire()
        assert RunLock.holder(out)["pid"] == os.getpid()  # probing did not drop our lock
    assert not (out / LOCK_NAME).exists() and RunLock.holder(out) is None
    with RunLock(out):  # free again
        pass


def test_lock_is_released_when_the_block_raises(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with RunLock(tmp_path / "run"):
            raise KeyboardInterrupt
    with RunLock(tmp_path / "run"):
        pass


def test_remote_lock_is_advisory_and_takes_over_a_dead_holder():
    out = f"memory://runlock-{uuid.uuid4().hex}/run"
    fs = fsspec.filesystem("memory")
    with RunLock(out) as lock:
        with pytest.raises(StorageError, match=rf"in use by pid {os.getpid()}"):
            RunLock(out).acquire()
        assert RunLock.holder(out)["token"] == lock.info["token"]
    assert RunLock.holder(out) is None
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fs.pipe(f"{out}/{LOCK_NAME}".removeprefix("memory://"),
            json.dumps({"pid": int(dead.stdout), "host": HOST}).encode())
    with RunLock(out) as lock:
        assert lock.took_over["pid"] == int(dead.stdout)
    fs.pipe(f"{out}/{LOCK_NAME}".removeprefix("memory://"), json.dumps({"pid": 1, "host": "elsewhere"}).encode())
    with pytest.raises(StorageError, match=r"in use by pid 1 on host elsewhere.*if no run is active, delete"):
        RunLock(out).acquire()


# ---------------------------------------------------------------- RunLock, real processes

HOLDER = textwrap.dedent("""
    import os, sys, time
    from storage import RunLock
    out, mode = sys.argv[1], sys.argv[2]
    with RunLock(out, command="holder " + mode):
        if mode == "fork":  # an engine worker it started, which outlives it
            if os.fork() == 0:
                time.sleep(60)
                os._exit(0)
        print("locked", flush=True)
        time.sleep(60)
""")


def start_holder(out, mode="plain"):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), mode], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True)
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()
    return proc


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_second_process_is_refused_until_the_holder_ends(tmp_path, how):
    out = tmp_path / "shared"
    holder = start_holder(out)
    try:
        with pytest.raises(StorageError, match=rf"run folder {out} is in use by pid {holder.pid} since \S+ "
                                               r"\(holder plain\)\. Fix: wait"):
            RunLock(out).acquire()
        assert RunLock.holder(out)["pid"] == holder.pid
    finally:
        holder.send_signal(how)
        holder.wait(timeout=10)
    with RunLock(out) as lock:  # taken over at once, whatever the way the holder ended
        assert lock.info["pid"] == os.getpid()
        if how != signal.SIGINT:  # no cleanup ran: the dead holder's file was taken over
            assert lock.took_over["pid"] == holder.pid


def test_a_forked_child_of_the_holder_does_not_keep_the_lock(tmp_path):
    out = tmp_path / "shared"
    holder = start_holder(out, "fork")
    children = subprocess.run(["pgrep", "-s", str(holder.pid)], capture_output=True, text=True).stdout.split()
    try:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        survivors = [int(p) for p in children if int(p) != holder.pid]
        assert survivors and all(_alive(p) for p in survivors)  # the forked worker still runs
        with RunLock(out) as lock:
            assert lock.took_over["pid"] == holder.pid
    finally:
        os.killpg(holder.pid, signal.SIGKILL)


def test_two_processes_racing_for_one_folder_one_wins(tmp_path):
    out = tmp_path / "shared"
    script = textwrap.dedent("""
        import pathlib, sys, time
        from storage import RunLock, StorageError
        results = pathlib.Path(sys.argv[2])
        try:
            with RunLock(sys.argv[1]):
                deadline = time.time() + 60  # hold it until both others have tried
                while len(list(results.glob("lost-*"))) < 2 and time.time() < deadline:
                    time.sleep(0.05)
                print("won", flush=True)
        except StorageError as e:
            (results / f"lost-{time.time_ns()}").write_text(str(e))
            print("lost:", e, flush=True)
    """)
    results = tmp_path / "results"
    results.mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", script, str(out), str(results)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for _ in range(3)]
    outputs = [p.communicate(timeout=90)[0].strip() for p in procs]
    assert sorted(r.split(":")[0] for r in outputs) == ["lost", "lost", "won"], outputs
    assert all("is in use by pid" in r for r in outputs if r.startswith("lost"))


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"
