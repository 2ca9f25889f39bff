"""An exclusive, advisory lock on a store directory that says who holds it.

``fcntl.flock`` is released by the kernel when the holder exits, so a crashed
process never leaves a stale lock behind; the lock file's body only records the
holder (pid, host, command, since when) so the next opener's error can name it.
POSIX only (Linux, macOS), like the deployments this project targets.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from retrieval.errors import StoreError, StoreLockedError

LOCK_NAME = ".embedstore.lock"


class DirectoryLock:
    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # a read-only mount, a folder of another user's: not a traceback
            raise StoreError(
                f"cannot open the embedded store at {str(self.path.parent)!r}: {exc.strerror or exc} "
                f"({exc.filename}). It needs a writable folder, even to read (its lock file and Qdrant Edge's "
                "write-ahead log live there): copy a read-only snapshot somewhere writable to read it"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreLockedError(
                f"the embedded store at {self.path.parent} is in use by {self._describe_holder()}; "
                "one process owns an embedded store at a time: stop that process, or reach the data "
                "through it (e.g. its gRPC service), or use the Qdrant server backend for shared access"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200] if sys.argv else "",
            "since": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        self._fd = fd  # held from here: release() closes it whatever happens below
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)
            os.fsync(fd)
        except OSError:
            # a full device: the lock holds without its holder's description (the store's own free-space check
            # then names the device); an escaping error left the fd open and locked this very process out
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _describe_holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return "another process (holder unknown)"
        same = info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()
        who = "this same process (another open handle)" if same else f"pid {info.get('pid')}"
        return f"{who} on host {info.get('host')} since {info.get('since')} (command: {info.get('command')!r})"
