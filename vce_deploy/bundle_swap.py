"""Replacing a bundle directory whole: build it in a temporary sibling, then swap it into place.

A failed or killed writer (export, engine build) leaves the old bundle, or nothing, at the
destination, never half a bundle; a directory that is not a bundle is never deleted.
"""
from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .bundle import MANIFEST
from .errors import BundleError
from .fsio import current_umask

STAGING, RETIRED = "staging", "old"


def check_replaceable(final: str | os.PathLike) -> None:
    """A bundle writer may replace `final` only if it is absent, an empty directory or a bundle
    (it holds manifest.json): `--out ~` must never delete a home directory."""
    final = Path(final)
    if not os.path.lexists(final):
        return
    if final.is_symlink() or not final.is_dir():
        raise BundleError(f"{final}: expected a bundle directory (or nothing) to replace, got a "
                          f"{'symlink' if final.is_symlink() else 'file'}; refusing to replace it")
    if (final / MANIFEST).is_file():
        return
    others = sorted(p.name for p in final.iterdir())
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise BundleError(f"{final}: expected an empty directory or a bundle (with {MANIFEST}) to replace, got a "
                          f"directory with {len(others)} other entries ({shown}); refusing to delete them")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> list[Path]:
    """Remove the staging and retired directories of exports of `final` that were killed
    (their process is gone). Names: .NAME.staging.PID-XXXX, .NAME.old.PID-XXXX."""
    removed = []
    for kind in (STAGING, RETIRED):
        prefix = f".{final.name}.{kind}."
        for path in final.parent.glob(f"{glob.escape(prefix)}*"):
            pid = path.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE): `b` never stops existing.
    False where that is not available (other systems, some filesystems)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under root, so a power cut after the rename cannot
    leave a renamed bundle with empty files."""
    for directory, _, names in os.walk(root):
        for name in names:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; on success it replaces `final` whole,
    on any error it is removed and `final` is left as it was.

    `final` must be absent, an empty directory or a bundle (check_replaceable). On Linux the
    swap is one renameat2(RENAME_EXCHANGE), so at every instant `final` is the whole old
    bundle or the whole new one, even under SIGKILL; elsewhere it is two renames, with an
    instant where `final` is absent (never half there). Staging directories left by killed
    exports (named with their PID) are removed by the next export of the same `final`.
    """
    final = Path(final).resolve()
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{STAGING}.{os.getpid()}-"))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide the bundle from other users
    try:
        yield staging
        check_replaceable(final)  # again: something may have appeared there meanwhile
        _fsync_tree(staging)
        if final.exists() and _exchange(staging, final):
            shutil.rmtree(staging, ignore_errors=True)  # staging now holds the old bundle
        elif final.exists():
            retired = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{RETIRED}.{os.getpid()}-"))
            os.replace(final, retired / "old")
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
        _fsync(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
