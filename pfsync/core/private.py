"""Private files: what pfsync keeps holds patient data, so it is its user's alone.

Directories are made 0700 and files 0600 by setting the mode explicitly, whatever the umask.
Files in the state directory are opened with O_NOFOLLOW: a symbolic link planted where pfsync
writes is refused, never followed (it would truncate or append to whatever it points at).
Temporary files get unpredictable names and O_EXCL (`tempfile.mkstemp`); a scratch file that
must not outlive its user (`anonymous_file`) never has a name at all, or loses it at once. A
directory owned by another user is refused: that user could read what we write there, or swap it
under us.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import tempfile
from pathlib import Path

from pfsync.core.errors import StateError

DIR_MODE = 0o700
FILE_MODE = 0o600
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC


def private_dir(path: Path, *, tighten: bool = False, check_owner: bool = True) -> Path:
    """`path` as a directory of ours: missing parts are created 0700; an existing one must be a
    directory owned by us (a symlink to one is followed: an operator may link the state directory
    elsewhere); `tighten` also takes group/other access away from an existing one (a state
    directory made by an older pfsync under umask 022); without `check_owner` an existing one may
    be another user's (a directory we only drop a public file into)."""
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, DIR_MODE)
        except FileExistsError:
            continue  # made by a concurrent run: checked below like any existing directory
        except OSError as exc:
            raise StateError(f"cannot create the directory {directory}: {exc.strerror}") from None
        os.chmod(directory, DIR_MODE)  # the umask may have taken bits away: 0700 is what we mean
    try:
        info = os.stat(path)
    except OSError as exc:
        raise StateError(f"cannot use the directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise StateError(f"{path} is not a directory")
    if check_owner:
        _check_owner(path, info, "directory")
    if tighten and info.st_mode & 0o077:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IMODE(info.st_mode) & ~0o077)
    return path


def open_private(path: Path, flags: int) -> int:
    """os.open for a file pfsync keeps: never through a symlink, 0600, owned by us, one link.

    An existing file from an older pfsync (0644 under umask 022) is narrowed to 0600."""
    try:
        fd = os.open(path, flags | _NOFOLLOW, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(
                f"{path} is a symbolic link: refused (pfsync never writes through one)",
                hint="remove the link; pfsync creates the file itself",
            ) from None
        raise StateError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateError(f"{path} is not a regular file")
        _check_owner(path, info, "file")
        if info.st_nlink > 1:
            raise StateError(f"{path} has other hard links: refused", hint="remove it; pfsync recreates it")
        if stat.S_IMODE(info.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def create_exclusive(path: Path) -> int:
    """A new file at `path` for writing (O_EXCL, 0600): whatever sat there (a stale file or a
    planted link) is removed first, never opened."""
    for _ in range(2):
        try:
            return open_private(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        except StateError:
            if not os.path.lexists(path):
                raise
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    raise StateError(f"cannot create {path}: something keeps recreating it")


def anonymous_file(directory: Path) -> int:
    """A scratch file in `directory` (read-write, 0600, ours) that no name leads to, so nothing is
    left behind on any exit path, a kill included: closing the descriptor frees it. O_TMPFILE
    where the filesystem has it (the file never has a name; O_EXCL: it can never be given one);
    elsewhere a new file with an unpredictable name (O_EXCL, O_NOFOLLOW), unlinked at once."""
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile:
        try:
            fd = os.open(directory, tmpfile | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise StateError(f"cannot create a temporary file in {directory}: {exc.strerror}") from None
        else:
            os.fchmod(fd, FILE_MODE)  # the umask may have taken bits away: 0600 is what we mean
            return fd
    path = directory / f".pfsync-{secrets.token_hex(12)}.tmp"
    fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)  # never through a link, 0600, ours
    try:
        os.unlink(path)
    except OSError as exc:
        os.close(fd)
        raise StateError(f"cannot remove the temporary file {path}: {exc.strerror}") from None
    return fd


def private_sqlite(path: Path) -> None:
    """Prepare `path` for sqlite3.connect: the database exists as a private regular file, and no
    -wal/-shm/-journal beside it is a link or open to others. SQLite gives the files it creates
    the database's mode, so WAL and SHM are 0600 too."""
    os.close(open_private(path, os.O_RDWR | os.O_CREAT))
    for suffix in ("-wal", "-shm", "-journal"):
        side = Path(f"{path}{suffix}")
        if os.path.lexists(side):
            os.close(open_private(side, os.O_RDWR))


def _check_owner(path: Path, info: os.stat_result, what: str) -> None:
    if info.st_uid != os.geteuid():
        raise StateError(
            f"{what} {path} belongs to another user (uid {info.st_uid}): refused",
            hint="run pfsync as that user, or point PFSYNC_STATE_DIR (or --out) at a directory of your own",
        )


def replace_atomically(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` so that `path` holds either its old or its new content, never a mix: a temp
    file in the same directory (mkstemp: an unpredictable name, O_EXCL), `mode` set explicitly,
    fsync, rename, fsync the directory. The caller vouches for the directory."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory's own data)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
