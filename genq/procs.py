"""Process plumbing for ``genq up``: the data-folder lock, children that die with their
parent, and the children's log files.

- One ``genq up`` per data folder: an exclusive ``flock`` on ``<data>/up.lock``, held for
  the life of the process and released by the kernel however it ends (even SIGKILL).
- Children get ``PR_SET_PDEATHSIG`` (Linux): if ``genq up`` dies without stopping them
  (SIGKILL, a crash), each child gets SIGTERM and stops as it would on Ctrl-C (Redis
  fsyncs its AOF, the worker hands its jobs back or leaves them to lease expiry).
- Children write to ``<data>/logs/<name>.log``, never to the terminal (``genq logs``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import sys
from collections import deque
from pathlib import Path
from typing import IO

PR_SET_PDEATHSIG = 1
CHILDREN = ("api", "worker", "redis")


class FolderBusy(SystemExit):
    pass


class FolderLock:
    """An exclusive lock on a data folder; the holder's pid is written in the lock file."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "up.lock"
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        f = open(self.path, "a+")  # held until release()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            holder = f.read().strip() or "?"
            f.close()
            raise FolderBusy(
                f"another `genq up` (pid {holder}) is running on {self.path.parent}: stop it first, "
                "or give this one its own --data-dir"
            ) from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


def die_with_parent() -> None:
    """``preexec_fn`` of every child: SIGTERM when ``genq up`` dies, however it dies."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def logs_dir(data_dir: Path) -> Path:
    return data_dir / "logs"


def log_path(data_dir: Path, name: str) -> Path:
    if name == "redis":
        return data_dir / "redis" / "redis.log"
    return logs_dir(data_dir) / f"{name}.log"


def open_log(data_dir: Path, name: str) -> IO[bytes]:
    path = log_path(data_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "ab", buffering=0)  # handed to the child


def last_lines(path: Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``n`` lines of a log file (read from its last ``max_bytes``)."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
        return list(deque(f.read().decode("utf-8", "replace").splitlines(), maxlen=n))
    return []


class Tail:
    """New complete lines of a growing file, read from where the last call stopped."""

    def __init__(self, path: Path, from_end: bool = True) -> None:
        self.path = path
        self.offset = path.stat().st_size if from_end and path.exists() else 0
        self._partial = b""

    def read(self) -> list[str]:
        try:
            with open(self.path, "rb") as f:
                if f.seek(0, os.SEEK_END) < self.offset:  # truncated or replaced: start over
                    self.offset = 0
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return []
        self.offset += len(chunk)
        data = self._partial + chunk
        *lines, self._partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]
