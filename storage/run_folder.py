"""The run folder (`--out`): which paths may be one, and one run at a time in each.

    out = check_run_folder(args.out)          # StorageError for "", "/", ~, a file, ... (exit 2)
    with RunLock(out):                        # StorageError "run folder ... in use by pid N"
        run the recipe; publish to f"{out}/publish"

`check_run_folder` creates nothing. `RunLock` keeps `<out>/.alignforge-run.lock` holding the
holder's pid, host, start time and command. On a local disk the lock is a POSIX record lock
(`fcntl.lockf`): the kernel drops it when the holder exits in any way (return, exception,
SIGINT, SIGTERM, SIGKILL), so a dead run's lock is taken over without asking, and processes the
run forks (engine workers) do not inherit it. On fsspec URLs (s3://, ...) there is no such lock:
the file is advisory; a lock of a dead pid on this host is taken over, others are reported.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import fsspec

from storage.dataset import StorageError
from storage.owner import HOST, pid_alive

LOCK_NAME = ".alignforge-run.lock"

_HELD: dict[str, "RunLock"] = {}  # lock key -> holder in this process (POSIX locks are per process)
_HELD_GUARD = threading.Lock()


def _is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def check_run_folder(out: str | os.PathLike | None) -> str:
    """Return `out` (trailing "/" removed, "~" expanded) if it can be a run folder, else raise StorageError.

    Refused, each with the folder named and the fix: an empty path, the filesystem root (or a
    bucket root), the home folder or a folder above it, an existing file, a path through a file,
    a folder whose nearest existing parent is not writable. Nothing is created."""
    text = "" if out is None else os.fspath(out)
    fix = "Fix: pass a folder of its own for this run, e.g. --out runs/my-run"
    if not text.strip():
        raise StorageError(f"the output folder is empty (--out {text!r}): alignforge would write its stages and "
                           f"publish/ folders at an unintended place. {fix}")
    if _is_remote(text):
        fs, path = fsspec.core.url_to_fs(text)
        if not path.strip("/"):
            raise StorageError(f"the output folder {text} is the root of its filesystem / bucket. {fix}")
        try:
            if fs.exists(path) and not fs.isdir(path):
                raise StorageError(f"the output folder {text} is a file. Fix: remove that file, or pass another "
                                   f"--out folder")
        except OSError as e:
            raise StorageError(f"cannot check the output folder {text} ({type(e).__name__}: {e}). Fix: check the "
                               f"URL and your credentials, or pass another --out") from None
        return text.rstrip("/")

    local = text.removeprefix("file://")
    path = Path(local).expanduser()
    resolved = path.resolve()  # absolute, symlinks followed; missing parts are fine
    if resolved == Path(resolved.anchor):
        raise StorageError(f"the output folder {text!r} is the filesystem root ({resolved}): alignforge would "
                           f"write {resolved.anchor}stages and {resolved.anchor}publish. {fix}")
    home = Path.home().resolve()
    if resolved == home:
        raise StorageError(f"the output folder {text!r} is your home folder ({home}): alignforge would write "
                           f"stages/ and publish/ straight into it. {fix}")
    if resolved in home.parents:
        raise StorageError(f"the output folder {text!r} ({resolved}) holds your home folder. {fix}")
    if resolved.exists() and not resolved.is_dir():
        raise StorageError(f"the output folder {text!r} ({resolved}) is a file, not a folder. Fix: remove that "
                           f"file, or pass another --out folder")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"the output folder {text!r} cannot be created: {existing} is a file. Fix: pass another "
                           f"--out folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "the output folder" if existing == resolved else f"{existing} (where the output folder {resolved} would be created)"
        raise StorageError(f"cannot write to {where}: permission denied. Fix: pass an --out folder you can "
                           f"write to, or fix its permissions")
    cleaned = os.fspath(path)
    return cleaned.rstrip("/") or cleaned


def _describe(info: dict[str, Any] | None) -> str:
    if not info:
        return "another process"
    parts = [f"pid {info.get('pid', '?')}"]
    if info.get("host") and info.get("host") != HOST:
        parts.append(f"on host {info['host']}")
    if info.get("started_at"):
        parts.append(f"since {info['started_at']}")
    text = " ".join(parts)
    if info.get("command"):
        text += f" ({info['command']})"
    return text


class RunLock:
    """One run per run folder; a context manager (see the module docstring).

    >>> with RunLock("runs/x") as lock:       # StorageError if another live run holds it
    ...     lock.info                          # {"pid", "host", "started_at", "command", "token"}
    `lock.took_over` holds the info of a dead holder whose lock was taken over (else None)."""

    def __init__(self, out: str | os.PathLike, *, command: str | None = None,
                 storage_options: dict | None = None):
        self.out = os.fspath(out).rstrip("/") or os.fspath(out)
        self.url = f"{self.out}/{LOCK_NAME}"
        self.command = command if command is not None else " ".join(
            [os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else None
        self.storage_options = storage_options or {}
        self.info: dict[str, Any] | None = None
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None
        self._key: str | None = None

    def __repr__(self) -> str:
        return f"RunLock({self.out!r}, held={self.held})"

    @property
    def held(self) -> bool:
        return self.info is not None

    def _new_info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "host": HOST,
                "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": self.command, "token": uuid.uuid4().hex}

    def _in_use(self, info: dict[str, Any] | None) -> StorageError:
        return StorageError(f"run folder {self.out} is in use by {_describe(info)}. Fix: wait for that run to "
                            f"finish, or use another --out")

    # ------------------------------------------------------------------------------ acquire

    def acquire(self) -> "RunLock":
        if self.held:
            raise StorageError(f"run folder {self.out}: this RunLock is already held")
        if _is_remote(self.out):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _key_for(self, folder: str) -> str:
        return os.path.realpath(folder)

    def _acquire_local(self) -> None:
        folder = self.out.removeprefix("file://")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create the run folder {self.out} ({type(e).__name__}: {e}). Fix: pass an "
                               f"--out folder you can write to") from None
        key = self._key_for(folder)
        path = os.path.join(folder, LOCK_NAME)
        with _HELD_GUARD:
            other = _HELD.get(key)
            if other is not None:  # POSIX locks don't exclude the same process: refuse here
                raise self._in_use(other.info)
            for _ in range(20):
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                except OSError as e:
                    raise StorageError(f"cannot create the lock file {path} ({type(e).__name__}: {e}). Fix: pass "
                                       f"an --out folder you can write to") from None
                try:
                    import fcntl

                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    info = _read_fd(fd)
                    os.close(fd)
                    if e.errno in (errno.EAGAIN, errno.EACCES):
                        raise self._in_use(info) from None
                    raise StorageError(f"cannot lock {path} ({e}). Fix: use a run folder on a local disk") from None
                # The holder before us may have unlinked the file between our open and lock.
                try:
                    same = os.path.samestat(os.fstat(fd), os.stat(path))
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                previous = _read_fd(fd)
                self.took_over = previous or None
                self.info = self._new_info()
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.info).encode(), 0)
                os.fsync(fd)
                self._fd, self._key = fd, key
                _HELD[key] = self
                return
        raise StorageError(f"could not lock {path}: it keeps being replaced. Fix: make sure no other run uses "
                           f"{self.out}, then rerun")

    def _acquire_remote(self) -> None:
        fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
        key = f"{type(fs).__name__}:{path}"
        with _HELD_GUARD:
            if key in _HELD:
                raise self._in_use(_HELD[key].info)
            info = _read_remote(fs, path)
            if info is not None:
                dead_here = info.get("host") == HOST and not pid_alive(int(info.get("pid", -1)))
                if not dead_here:
                    error = self._in_use(info)
                    error.args = (error.args[0] + f" (if no run is active, delete {self.url})",)
                    raise error
                self.took_over = info
            mine = self._new_info()
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe(path, json.dumps(mine).encode())
            if (_read_remote(fs, path) or {}).get("token") != mine["token"]:  # lost a race
                raise self._in_use(_read_remote(fs, path))
            self.info, self._key = mine, key
            _HELD[key] = self

    # ------------------------------------------------------------------------------ release

    def release(self) -> None:
        """Give the folder back (removes the lock file). Safe to call twice."""
        if not self.held:
            return
        with _HELD_GUARD:
            _HELD.pop(self._key, None)
            if self._fd is not None:
                path = os.path.join(self.out.removeprefix("file://"), LOCK_NAME)
                try:
                    if os.path.samestat(os.fstat(self._fd), os.stat(path)):
                        os.unlink(path)  # while still locked: a waiter re-checks the inode
                except OSError:
                    pass
                os.close(self._fd)  # drops the lock
                self._fd = None
            else:
                fs, path = fsspec.core.url_to_fs(self.url, **self.storage_options)
                try:
                    if (_read_remote(fs, path) or {}).get("token") == self.info["token"]:
                        fs.rm(path)
                except OSError:
                    pass
            self.info = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    def holder(out: str | os.PathLike) -> dict[str, Any] | None:
        """Info of the run holding `out` now, or None when free (for status messages)."""
        out = os.fspath(out).rstrip("/")
        if _is_remote(out):
            fs, path = fsspec.core.url_to_fs(f"{out}/{LOCK_NAME}")
            return _read_remote(fs, path)
        path = os.path.join(out.removeprefix("file://"), LOCK_NAME)
        key = os.path.realpath(os.path.dirname(path))
        with _HELD_GUARD:
            if key in _HELD:
                return dict(_HELD[key].info)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        import fcntl

        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _read_fd(fd) or {}
        finally:
            os.close(fd)  # releases the probe lock if we got it
        return None


def _read_fd(fd: int) -> dict[str, Any] | None:
    try:
        data = os.pread(fd, 65536, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _read_remote(fs, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None
