"""Lock files: one ``flock``-ed file per grant, the lease of the file coordinator.

The kernel drops a lock when its process dies, even by SIGKILL, so a dead leader frees its
grant at once. A lock file is unlinked only by a process holding its lock, and a process that
has just locked one checks that the path still names the file it locked (else it starts
over): so unlinking never lets two processes lead at once, and the directory stays small.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

from ._errors import ConfigurationError

if sys.platform != "win32":
    import fcntl

__all__ = ["GRANT_KEY", "LockFiles", "flocked", "private_directory", "same_file"]

GRANT_KEY = re.compile(r"[0-9a-f]{16,64}")  # what Sealer.name returns; never a path
_STRAY_AGE = 60.0  # an unlocked lock file this old was left by a leader that died


class LockFiles:
    """The lock files in ``directory``, one per grant key."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def held_elsewhere(self, key: str) -> bool:
        """Whether some process holds the grant's lock now (a probe that never blocks)."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            # Shared: probes never block each other, only a leader's exclusive lock blocks them.
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops the probe's lock
        return False

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def lock(self, key: str) -> int | None:
        """An fd holding the grant's lock, or ``None`` if another process holds it."""
        path = self.path(key)
        for _ in range(8):  # each retry means the file was unlinked under us: rare
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            if same_file(fd, path):
                return fd
            os.close(fd)  # we locked a file its holder had already unlinked: start over
        return None

    def unlock(self, key: str, fd: int) -> None:
        try:
            # Unlink while holding the lock (see the module docstring), then let go.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(key))
            fcntl.flock(fd, fcntl.LOCK_UN)  # also for a child that inherited the fd by fork
        finally:
            os.close(fd)

    def sweep(self, now: float) -> None:
        """Unlink lock files that leaders which died left behind (those nobody holds)."""
        with contextlib.suppress(OSError), os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(".lock") or not GRANT_KEY.fullmatch(name[:-5]):
                    continue
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime < _STRAY_AGE:
                        continue
                    fd = self.lock(name[:-5])
                    if fd is not None:
                        self.unlock(name[:-5], fd)


def same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


def private_directory(path: Path, *, shared_parent: bool) -> Path:
    """``path``, created with mode 0700 if missing. In a shared parent (the temp directory)
    it must be a real directory of ours, not something another user planted there."""
    try:
        path.mkdir(mode=0o700, parents=not shared_parent)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigurationError(f"cannot create {str(path)!r}: {exc}") from exc
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigurationError(f"{str(path)!r} is not a directory")
    if shared_parent and (info.st_uid != os.getuid() or info.st_mode & 0o077):
        raise ConfigurationError(
            f"{str(path)!r} must be a private directory (owned by uid {os.getuid()}, mode 0700)"
        )
    return path


@contextlib.contextmanager
def flocked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
