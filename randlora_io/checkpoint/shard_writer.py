"""Append-only writer for a new output file, bypassing the page cache where the file system allows.

A merged shard is written once, front to back, and is not read again by this process: routing gigabytes of it through
the page cache costs a kernel copy per byte and evicts what other programs had cached. Where ``O_DIRECT`` is
available (Linux; most local file systems), bytes are gathered in one page-aligned staging buffer and written in
aligned chunks; the tail is padded to the block size and the file truncated back to its true length. Anywhere else, or
if the file system refuses an aligned write, the writer continues with plain buffered writes. Set
``RANDLORA_IO_DIRECT=0`` to always use buffered writes.
"""

from __future__ import annotations

import errno
import functools
import mmap
import os

from ..errors import SafetensorsFormatError

BLOCK = 4096  # alignment of O_DIRECT offsets, lengths and buffers: the largest common logical block size
CHUNK = 8 * 2**20  # bytes per aligned write


def write_all(fd: int, data: memoryview) -> None:
    """Write every byte of ``data`` at ``fd``'s position (``write`` may stop short, e.g. at 2 GiB on Linux)."""
    while len(data):
        data = data[os.write(fd, data):]


def read_exact(fd: int, view: memoryview, offset: int, truncated: str) -> None:
    """Fill ``view`` from ``fd`` at byte ``offset``; raise ``SafetensorsFormatError(truncated)`` at end of file."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise SafetensorsFormatError(truncated)
        done += n


def copy_range(fd_in: int, fd_out: int, offset: int, size: int, truncated: str) -> None:
    """Append ``size`` bytes of ``fd_in`` from ``offset`` at ``fd_out``'s position: in the kernel
    (``copy_file_range``) where the OS allows, else through one bounded buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < size:
                n = os.copy_file_range(fd_in, fd_out, size - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError:
            pass  # cross-device, unsupported file system, old kernel: finish with plain reads and writes
    if done == size:
        return
    chunk = bytearray(min(CHUNK, size - done))
    while done < size:
        view = memoryview(chunk)[: min(len(chunk), size - done)]
        read_exact(fd_in, view, offset + done, truncated)
        write_all(fd_out, view)
        done += len(view)


def _names_the_file(method):
    """Re-raise an OSError from the descriptor-level calls (which carry no file name) with the writer's path, so the
    CLI's one line says which file could not be written (e.g. a full disk)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, f"cannot write ({exc.strerror or exc})", self.path) from None

    return wrapper


def direct_io_wanted() -> bool:
    """O_DIRECT is tried unless the platform lacks it or ``RANDLORA_IO_DIRECT=0``."""
    return hasattr(os, "O_DIRECT") and os.environ.get("RANDLORA_IO_DIRECT", "1") != "0"


class SequentialWriter:
    """Writes a new file front to back: ``write`` bytes, ``copy_from`` ranges of another file, then ``close``.

    ``direct``: try O_DIRECT (see the module docstring); ``chunk``: bytes per aligned write (a multiple of BLOCK).
    """

    def __init__(self, path: str | os.PathLike, direct: bool | None = None, chunk: int = CHUNK) -> None:
        assert chunk % BLOCK == 0
        self.path = os.fspath(path)
        self.size = 0  # logical bytes written so far
        self._chunk = chunk
        self._fd = -1
        self._stage: memoryview | None = None
        self._mmap: mmap.mmap | None = None
        self._fill = 0
        if direct_io_wanted() if direct is None else direct:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
                self._mmap = mmap.mmap(-1, chunk)  # page-aligned staging buffer
                self._stage = memoryview(self._mmap)
            except OSError:
                self._close_fd()
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @property
    def direct(self) -> bool:
        """Whether bytes still go through the O_DIRECT staging buffer."""
        return self._stage is not None

    @_names_the_file
    def write(self, data: memoryview | bytes) -> None:
        """Append ``data``."""
        data = memoryview(data).cast("B")
        while len(data) and self._stage is not None:
            k = min(self._chunk - self._fill, len(data))
            self._stage[self._fill: self._fill + k] = data[:k]
            data = data[k:]
            self._staged(k)
        if len(data):
            write_all(self._fd, data)
            self.size += len(data)

    @_names_the_file
    def copy_from(self, fd_in: int, offset: int, size: int, truncated: str) -> None:
        """Append ``size`` bytes of the file ``fd_in`` starting at ``offset`` (read straight into the staging buffer
        when direct, else copied by the kernel)."""
        while size and self._stage is not None:
            k = min(self._chunk - self._fill, size)
            read_exact(fd_in, self._stage[self._fill: self._fill + k], offset, truncated)
            offset, size = offset + k, size - k
            self._staged(k)
        if size:
            copy_range(fd_in, self._fd, offset, size, truncated)
            self.size += size

    @_names_the_file
    def close(self) -> None:
        """Flush the staged tail (padded to BLOCK, then the file is truncated to its true length), make the file
        durable (``fsync``: the caller renames it into place next, and a crash must not leave a renamed file whose
        data never reached the disk), and close."""
        if self._fd < 0:
            return
        try:
            if self._stage is not None and self._fill:
                pad = -self._fill % BLOCK
                self._stage[self._fill: self._fill + pad] = bytes(pad)
                self._flush(self._fill + pad)
                os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
        finally:
            self._close_fd()

    def __enter__(self) -> SequentialWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._close_fd()

    # ------------------------------------------------------------------------------------------------------------

    def _staged(self, k: int) -> None:
        self._fill += k
        self.size += k
        if self._fill == self._chunk:
            self._flush(self._chunk)

    def _flush(self, length: int) -> None:
        """Write ``stage[:length]`` (BLOCK-aligned) with O_DIRECT; if the file system refuses, switch to buffered."""
        assert self._stage is not None
        pending, self._fill = self._stage[:length], 0
        try:
            n = os.write(self._fd, pending)
            if n == length:
                return
            pending = pending[n:]
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        # A short or refused aligned write: reopen without O_DIRECT at the same place and go on buffered.
        position = os.lseek(self._fd, 0, os.SEEK_CUR)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY)
        os.lseek(self._fd, position, os.SEEK_SET)
        write_all(self._fd, pending)
        self._stage = self._mmap = None  # unmapped once the last view of it is gone

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._stage = self._mmap = None
