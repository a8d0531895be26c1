"""Who wrote a temporary file, and whether that writer can still be running.

Temporary names carry their writer: `.<name>.tmp-<host>~<pid>~<uuid32>`. A cleanup removes a
temporary file only when its writer is certainly gone (same host, pid no longer running) or the
name has no owner (written by an older alignforge); another live writer's file is left alone,
so two writers of the same shard never delete each other's in-flight file.
"""

from __future__ import annotations

import os
import re
import socket
import uuid

HOST = socket.gethostname() or "localhost"
# Hostnames never contain "~"; the uuid part is exactly 32 hex digits.
_OWNED_TMP = re.compile(r"\.tmp-(?P<host>[^~]+)~(?P<pid>\d+)~(?P<token>[0-9a-f]{32})$")


def tmp_suffix() -> str:
    """`.tmp-<host>~<pid>~<uuid>` for a new temporary file or folder of this process."""
    return f".tmp-{HOST}~{os.getpid()}~{uuid.uuid4().hex}"


def pid_alive(pid: int) -> bool:
    """True when process `pid` exists on this host and is not a zombie (when in doubt: True)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[-1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def tmp_is_stale(name: str) -> bool:
    """Whether the temporary file `name` may be removed: its writer is gone, or it names none.

    A file of this very process is not stale (another thread may be writing it); a file of
    another host is never judged stale here (its pid means nothing on this one)."""
    m = _OWNED_TMP.search(name)
    if m is None:
        return ".tmp-" in name  # legacy `.tmp-<hex>` name without an owner: an old, dead writer
    if m.group("host") != HOST:
        return False
    pid = int(m.group("pid"))
    return pid != os.getpid() and not pid_alive(pid)
