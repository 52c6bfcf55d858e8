"""Durable file operations of the model store: atomic writes, fsynced renames, read-only trees.

A rename is atomic on POSIX file systems, but it is durable only once the directory that holds
the new name is fsynced; every helper here fsyncs what it creates before returning.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any, Callable

from edge.errors import StoreError

# Prefix of temporary files beside their final name; recovery removes any it finds.
TMP_PREFIX = ".tmp-"
# Installed payload files are read-only: nothing but the store (which makes them writable
# again to delete them) may change the bytes that were hashed at install.
FILE_MODE, DIR_MODE, WRITABLE_DIR_MODE = 0o444, 0o555, 0o755


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new, renamed or removed names) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> Path:
    """Create a directory (and fsync its parent) unless it exists; refuse a symlink."""
    try:
        os.mkdir(path, WRITABLE_DIR_MODE)
        fsync_dir(path.parent)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path} is not a directory (a symlink or a file is in the store's place)")
    return path


def write_atomic(path: Path, data: bytes, on_written: Callable[[], None] | None = None) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file, whole.

    ``on_written`` runs once the temporary file is fsynced, before the rename (a test seam).
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if on_written is not None:
            on_written()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet, fsynced (the directory is fsynced by the caller)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def dump_json(data: Any) -> bytes:
    """Serialize store metadata: sorted, indented, so people can read it on an SD card."""
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def read_json(path: Path) -> Any:
    """Read a JSON file, raising StoreError naming the file when it is unreadable."""
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"{path} is unreadable: {exc}") from exc


def seal_tree(root: Path) -> None:
    """Make every file under ``root`` read-only and fsync every directory below it.

    ``root`` itself stays writable: renaming a directory into another parent needs write
    permission on it (the kernel updates its ``..`` entry).
    """
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            # Files sealed already are left alone: a chmod, even to the same mode, changes the
            # ctime the store recorded as the file's identity when it hashed the file.
            if stat.S_IMODE(os.lstat(path).st_mode) != FILE_MODE:
                os.chmod(path, FILE_MODE)  # regular files only: extract writes no links
        fsync_dir(Path(dirpath))
        if Path(dirpath) != root:
            os.chmod(dirpath, DIR_MODE)


def remove_tree(path: Path) -> None:
    """Delete a store tree, read-only parts included; a missing path is fine."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
        return
    for dirpath, _dirs, _files in os.walk(path):
        os.chmod(dirpath, WRITABLE_DIR_MODE)
    shutil.rmtree(path)


def tree_bytes(path: Path) -> int:
    """Return the bytes of the regular files under ``path`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:  # removed by a concurrent cleanup
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total
