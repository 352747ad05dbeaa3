"""File-system safety shared by checkpoints, imported datasets and run folders.

- `make_temp_dir`: a temporary folder beside its target with the user's umask applied, unlike
  `tempfile.mkdtemp` (always 0700), so that a folder renamed into place is readable by whoever the user's
  umask lets read it (teammates on shared storage).
- `share_like_umask`: the same for files written by libraries that create them 0600 (safetensors).
- `fsync_dir`: make renames inside a folder durable across a power cut.
- `replace_folder`: put a finished folder in place of an existing one by renames only, so the old one is
  deleted only once the new one is in place (and is put back if that fails).
- `RunLock`: one process at a time per run folder, via `fcntl.flock` on `<run>/.lock`; the kernel drops
  the lock when its holder dies, so a crashed run never leaves the folder stuck.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask is set-and-return)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named folder `parent/<prefix><random>`, created with mode 0777 & ~umask."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            path.mkdir()  # mkdir applies the umask; mkdtemp would force 0700
            return path
        except FileExistsError:
            continue


def share_like_umask(folder: Path) -> None:
    """Give every file directly in `folder` mode 0666 & ~umask (safetensors writes 0600)."""
    mode = 0o666 & ~current_umask()
    for file in folder.iterdir():
        if file.is_file():
            os.chmod(file, mode)


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (renames, creations) to disk; a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def replace_folder(new: Path, target: Path) -> None:
    """Move the complete folder `new` to `target`, replacing whatever is there.

    The old `target` is first renamed aside (`.NAME.old-<random>` beside it), then `new` renamed into
    place, then the old copy deleted: no instant at which a failure leaves neither, and a failed second
    rename puts the old one back. (`os.replace` cannot replace a non-empty folder in one step.)
    """
    if not (target.exists() or target.is_symlink()):
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    old = target.parent / f".{target.name}.old-{secrets.token_hex(4)}"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    fsync_dir(target.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder's lock."""


LOCK_FILE = ".lock"


class RunLock:
    """Exclusive ownership of a run folder while a process writes to it.

    `acquire` takes a non-blocking `flock` on `<run>/.lock` and writes the holder (pid, host, start time,
    command) into it; a second process gets RunFolderBusy naming that holder. The lock lives as long as
    the open file: a killed process releases it, so no stale lock needs clearing by hand.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open until release: the open file is the lock)
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "an unknown process"
            f.close()
            raise RunFolderBusy(
                f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it "
                "(one process per run folder)"
            ) from None
        except BaseException:
            f.close()
            raise
        f.seek(0)
        f.truncate()
        command = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))
        f.write(
            f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({command})\n"
        )
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays, naming the last holder
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
