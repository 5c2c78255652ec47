"""Crash-safe file writes and the writer's lock.

A file is written under a temporary name in the same directory, flushed and fsync'ed, renamed over
its final name (os.replace: atomic on POSIX), and the directory fsync'ed so that the rename itself is
durable. A process killed at any point leaves either the old file or the new one, never a partial
file under the final name; what it leaves under a temporary name the next writer removes.
"""

import os

try:
    import fcntl
except ImportError:  # not POSIX: no advisory lock
    fcntl = None

TEMPORARY_PREFIX = ".tmp-"
LOCK_NAME = ".lock"


def fsync_directory(directory):
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(directory, name, data):
    """Write `data` (bytes) to directory/name so that the name only ever holds complete contents."""
    temporary = os.path.join(directory, f"{TEMPORARY_PREFIX}{os.getpid()}-{name}")
    with open(temporary, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, os.path.join(directory, name))
    fsync_directory(directory)


def is_temporary(name):
    return name.startswith(TEMPORARY_PREFIX)


class DirectoryLock:
    """An exclusive advisory lock on directory/.lock, held while a writer is open (the OS drops it
    when the process dies, however it dies)."""

    def __init__(self, directory):
        self._fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._fd)
                raise RuntimeError(f"another TeacherCacheWriter is writing {directory} (it holds {LOCK_NAME})") from None

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
