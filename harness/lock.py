"""One writer per run directory.

Two processes writing one run directory would append every sample twice and leave run.json
claiming one configuration. `run_lock` takes an exclusive OS-level lock (`filelock`, which uses
flock/fcntl on POSIX and msvcrt on Windows) on `DIR/.realign.lock` for the whole run or judging
session; a second writer is refused at once with a message naming the holder. The kernel releases
the lock when its holder dies, so a lock left by a killed process is taken over by the next run
without any staleness guesswork. Who holds it (pid, host, command, start time) is written beside
it in `DIR/.realign.lock.json`, since the lock file itself is truncated by every contender.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from harness.errors import RunDirError

LOCK_NAME = ".realign.lock"
HOLDER_NAME = ".realign.lock.json"
#: Files realign keeps in a run directory for itself (not outputs: an "empty" directory may hold them).
BOOKKEEPING = frozenset({LOCK_NAME, HOLDER_NAME})


def _holder(root: Path) -> str:
    try:
        info = json.loads((root / HOLDER_NAME).read_text(encoding="utf-8"))
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started_at')} "
                f"({info.get('command')})")
    except (OSError, ValueError):
        return "another process (holder unknown)"


@contextlib.contextmanager
def run_lock(root: Path, command: str) -> Iterator[None]:
    """Hold the run directory's lock for the duration of the block, or raise RunDirError at once."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(root / LOCK_NAME), timeout=0)
        lock.acquire()
    except Timeout:
        raise RunDirError(f"{root} is being written by {_holder(root)}; wait for it to finish, or stop it "
                          "(a killed holder releases the lock by itself)") from None
    except OSError as exc:
        raise RunDirError(f"{root}: cannot create or lock the run directory ({exc.strerror or exc})") from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                  "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (root / HOLDER_NAME).write_text(json.dumps(holder) + "\n", encoding="utf-8")
        yield
    finally:
        with contextlib.suppress(OSError):
            (root / HOLDER_NAME).unlink()
        lock.release()
