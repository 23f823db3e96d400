"""Outputs that appear whole or not at all, never over an input, never over another process's output.

- ``check_output_path``: OUT must not be, contain, or lie inside any input (paths resolved through symlinks).
- ``atomic_file`` / ``atomic_directory``: the output is built in a temp entry beside the destination, named
  ``.<dst name>.randlora-io-<pid>-<random>.tmp``, fsynced, then renamed into place. Without ``overwrite`` the final
  rename refuses to replace anything that appeared meanwhile (``renameat2(RENAME_NOREPLACE)``, or a hard link for
  files); with ``overwrite`` the new entry is swapped with the old one in one step (``RENAME_EXCHANGE``), so there is
  never a moment without OUT, and the old one is removed afterwards.
- Temp entries whose owning process is gone (SIGKILL, power loss) are removed by the next write beside them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import OutputExistsError, OutputWriteError, RandloraError

TEMP_MARK = "randlora-io"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike | None]) -> None:
    """Refuse an ``out`` that is, contains, or lies inside one of ``inputs`` (after resolving symlinks), so that
    neither writing OUT nor replacing it (``--overwrite``) can touch an input. ``None`` inputs are skipped."""
    out_r = _resolved(out)
    for item in inputs:
        if item is None:
            continue
        in_r = _resolved(item)
        if out_r == in_r:
            how = "is"
        elif out_r in in_r.parents:
            how = "contains"
        elif in_r in out_r.parents:
            how = "lies inside"
        else:
            continue
        raise OutputExistsError(f"{out}: the output {how} the input {item}; choose an output path outside every "
                                "input (with or without --overwrite, inputs are never replaced)")


def _temp_prefix(dst: Path) -> str:
    return f".{dst.name}.{TEMP_MARK}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(dst: str | os.PathLike) -> list[Path]:
    """Remove the temp entries of earlier writes of ``dst`` whose process no longer exists; returns what it removed.
    Only entries named by this module (``.<name>.randlora-io-<pid>-*.tmp`` / ``.old``) are ever touched."""
    dst = Path(dst)
    pattern = re.compile(rf"^\.{re.escape(dst.name)}\.{TEMP_MARK}-(\d+)-[^/]*\.(tmp|old)$")
    removed = []
    try:
        entries = list(dst.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()
        removed.append(entry)
    return removed


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False when the platform or file system does not support it."""
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _appeared(dst: Path) -> OutputExistsError:
    return OutputExistsError(f"{dst}: output appeared while this one was being written (another process?); "
                             "nothing was replaced; pass --overwrite to replace it")


def _install_new(tmp: Path, dst: Path) -> None:
    """Rename ``tmp`` to ``dst``, which must not exist: never replaces an entry that appeared meanwhile."""
    try:
        if _renameat2(tmp, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise _appeared(dst) from None
    if tmp.is_dir():  # rename(2) of a directory fails on a non-empty dir or a file; an empty dir is all it replaces
        if dst.exists() or dst.is_symlink():
            raise _appeared(dst)
        os.rename(tmp, dst)
        return
    try:
        os.link(tmp, dst)  # a hard link never replaces
    except FileExistsError:
        raise _appeared(dst) from None
    tmp.unlink()


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put ``tmp`` at ``dst`` replacing what is there, with no moment where ``dst`` is absent; the old entry
    ends up at ``tmp`` (removed by the caller)."""
    if not (dst.exists() or dst.is_symlink()):
        _install_new(tmp, dst)
        return
    if dst.is_symlink() or dst.is_dir() != tmp.is_dir():
        raise OutputExistsError(f"{dst}: exists and is a {'link' if dst.is_symlink() else 'different kind of entry'}; "
                                "remove it first")
    if _renameat2(tmp, dst, _RENAME_EXCHANGE):
        return
    if not tmp.is_dir():
        os.replace(tmp, dst)  # atomic for files
        return
    old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), suffix=".old", dir=dst.parent))
    os.replace(dst, old / "x")  # fallback without RENAME_EXCHANGE: a short window without dst
    os.replace(tmp, dst)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _naming_write_errors(dst: Path) -> Iterator[None]:
    """Re-raise an I/O failure while building ``dst`` (OSError, or safetensors' own error for one) as one
    :class:`OutputWriteError` that names ``dst``: "[Errno 28] No space left on device" alone says nothing of where."""
    try:
        yield
    except RandloraError:
        raise
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise  # e.g. an input that cannot be read: its own message names it
        where = f"{dst} ({Path(os.fsdecode(exc.filename)).name})" if exc.filename else str(dst)
        raise OutputWriteError(f"{where}: cannot write the output: {exc.strerror or exc}; nothing was written "
                               "(free space or choose another path)") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        reason = str(exc).split("I/O error:")[-1].strip()
        raise OutputWriteError(f"{dst}: cannot write the output: {reason}; nothing was written (free space or "
                               "choose another path)") from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_file(dst: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``dst``; on clean exit it becomes ``dst`` (replacing an existing file only
    when ``overwrite``), on error it is deleted."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dst), suffix=".tmp", dir=dst.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming_write_errors(dst):
            yield tmp_path
        if overwrite:
            _swap_in(tmp_path, dst)
        else:
            _install_new(tmp_path, dst)
        _fsync_dir(dst.parent)
    finally:
        _remove(tmp_path)


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``dst``; on clean exit it becomes ``dst``, on error it is removed.

    An existing ``dst`` is refused unless ``overwrite``; then the complete new one is swapped in and the old one
    removed after. Without ``overwrite`` a ``dst`` that appears while writing is never replaced."""
    dst = Path(dst)
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{dst}: output exists; pass --overwrite to replace it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dst)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), suffix=".tmp", dir=dst.parent))
    try:
        with _naming_write_errors(dst):
            yield tmp
        _fsync_dir(tmp)  # the entries of the new dir are durable before it is renamed into place
        if overwrite:
            _swap_in(tmp, dst)
        else:
            _install_new(tmp, dst)
        _fsync_dir(dst.parent)  # and so is the rename
    finally:
        _remove(tmp)


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries to disk where the platform and file system allow it (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
