"""One run at a time per output directory: an advisory lock that the operating system releases when its holder
exits, however it exits.

A second run on a directory in use is refused at once, in one line, with the holder's process id; it never waits
and never touches the first run's files. A killed run leaves its lock file behind, unlocked, so the next run takes
the directory over (and cleans up the temporaries the killed run left). The lock is a POSIX record lock, held by one
process: another process is refused, the holder itself is not (one process runs one command at a time).
"""

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from mdcore.errors import UserInputError
from mdcore.names import LOCK

__all__ = ["hold_directory", "holds_nothing", "remove_temporaries"]


@contextlib.contextmanager
def hold_directory(directory: str | Path, enabled: bool = True) -> Iterator[Path]:
    """Create `directory` if needed and hold its lock for the duration of the block (`UserInputError` when another
    process holds it). The lock file is removed when the block ends, and a directory this call created is removed
    again when the block fails before anything else was written into it. `enabled=False` holds
    nothing: only the main process of a multi-process run takes the lock, the others belong to the same run."""
    directory = Path(directory)
    if not enabled:
        yield directory
        return
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # A POSIX record lock belongs to this process alone: unlike flock's, it is not shared with the children
            # this process forks (DataLoader workers), so it goes when this process goes, however it goes.
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)  # the holder's file stays: it is not ours to remove
            raise UserInputError(f"{directory} is in use by another run (process {holder}); wait for it to finish "
                                 "or pick another --out") from None
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)  # a holder removed the file as it finished, after this process opened it: take a fresh one
    failed = True
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield directory
        failed = False
    finally:
        path.unlink(missing_ok=True)  # however the block ended, the holder leaves no lock file behind
        if failed and created and not any(directory.iterdir()):
            directory.rmdir()  # a run that failed before writing anything leaves no directory either
        os.close(fd)  # closing the descriptor releases the lock


def holds_nothing(directory: str | Path) -> bool:
    """Whether `directory` is missing or empty but for its lock file (a run may start afresh in it)."""
    directory = Path(directory)
    return not directory.exists() or all(p.name == LOCK for p in directory.iterdir())


def remove_temporaries(directory: str | Path) -> int:
    """Delete the hidden `.NAME.tmp-PID` files and directories a killed run left under `directory` (call it only
    while holding the directory); returns how many there were."""
    stale = sorted(Path(directory).rglob(".*.tmp-*"), key=lambda p: len(p.parts), reverse=True)
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(stale)
