"""Files every layer writes and reads: atomic writes, and model files loaded without running code.

A write goes to a temporary file beside its target and is renamed into place, so a reader (or a
resumed run) sees the old file or the whole new one. Model and checkpoint files are read with
``torch.load(..., weights_only=True)``: tensors, numbers, strings, lists and dicts only, so a file
carrying pickled code is refused instead of executed.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

WRITE_ERRORS = (errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG)
"""Errors of the disk rather than of the program: full disk or quota, I/O error, read-only, too large."""


def _write_file(path: Path, payload: bytes | Callable[[BinaryIO], None]) -> None:
    """Write and fsync ``payload`` into the new file ``path``: where the bundle's bytes reach the disk.
    ``payload`` is the bytes, or a function that writes them into the open file (a checkpoint
    streamed by ``torch.save`` instead of held twice in memory)."""
    with open(path, "wb") as fh:
        if callable(payload):
            payload(fh)
        else:
            fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())


TEMP_NAME = re.compile(r"^\.(?P<target>[^@]+)\.(?P<pid>\d+)@(?P<host>.+)\.[^.]+\.tmp$")
"""A temporary file of :func:`atomic_write_bytes`: ``.TARGET.PID@HOST.RANDOM.tmp`` beside ``TARGET``."""


def temp_prefix(path: Path) -> str:
    """Prefix of the temporary files of ``path``: ``.NAME.PID@HOST.``, naming the process that writes."""
    return f".{path.name}.{os.getpid()}@{socket.gethostname()}."


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host is running (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike, owned: Callable[[str], bool] | None = None) -> list[Path]:
    """Delete the temporary files in ``folder`` (not below) that a killed writer left behind.

    A writer killed (even by SIGKILL) between creating its temporary file and renaming it leaves the file;
    no reader ever opens it, but it holds disk space (a whole shard). Removed: those written on this host by a
    process that is gone, and, whatever their writer, those whose target name ``owned`` accepts (targets
    that only the caller writes, under its :class:`WriterLock`). A live writer's file is never touched.

    Returns:
        The files removed.
    """
    folder, removed = Path(folder), []
    host = socket.gethostname()
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        name = TEMP_NAME.match(tmp.name)
        if name is None:
            continue
        gone = name["host"] == host and not process_alive(int(name["pid"]))
        if gone or (owned is not None and owned(name["target"])):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | os.PathLike, payload: bytes | Callable[[BinaryIO], None]) -> None:
    """Write ``payload`` (bytes, or a function writing into a binary file) to ``path`` so that
    readers see the old file or the whole new one.

    Raises:
        OSError: naming ``path`` (not the temporary file) when the disk refuses the write (full,
            I/O error, read-only); the temporary file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        _write_file(Path(tmp), payload)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise


def atomic_torch_save(path: str | os.PathLike, obj) -> Path:
    """``torch.save`` through :func:`atomic_write_bytes`: readers (and a resumed run) see the old file
    or the whole new one. Returns ``path``; a refused write raises ``OSError`` naming ``path`` and
    leaves it unchanged."""
    atomic_write_bytes(path, lambda fh: torch.save(obj, fh))
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def write_nifti(img, path: str | os.PathLike) -> Path:
    """Write a NIfTI image (``nibabel.Nifti1Image``) to ``path`` (gzip-compressed when it ends in
    ``.gz``) atomically: a temporary file in the same folder, then a rename, so no reader sees half
    a volume."""
    path = Path(path)
    payload = img.to_bytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    atomic_write_bytes(path, payload)
    return path


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> dict:
    """``np.save`` atomically; returns the file's record ``{"bytes": size, "sha256": hex digest}``."""
    buf = io.BytesIO()
    np.save(buf, array)
    payload = buf.getvalue()
    atomic_write_bytes(path, payload)
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: str | os.PathLike, record: dict, checksum: bool = True) -> str | None:
    """Why ``path`` does not match its record (:func:`atomic_save_npy`), or None when it does.

    The size is always compared; the sha256 only with ``checksum`` (it reads the whole file)."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"{path}: {size} bytes, the manifest says {record['bytes']} (truncated or overwritten)"
    if checksum and file_digest(path) != record["sha256"]:
        return f"{path}: sha256 differs from the manifest's (corrupted)"
    return None


def one_line(text: object, limit: int) -> str:
    """``text`` as one line for a user: whitespace runs (newlines too) become single spaces, and a
    line longer than ``limit`` characters is cut to ``limit`` with ``...`` at its end."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_weights(path: str | os.PathLike, kind: str) -> object:
    """``torch.load`` a model or checkpoint file on the CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line naming the file when it is truncated, not a torch file, or carries
            pickled objects other than tensors and plain containers (code is never run).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {kind} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise ValueError(f"{path}: not a readable {kind} file (UnpicklingError)") from err
        raise ValueError(
            f"{path}: refused: the {kind} file carries pickled code ({found.group(1)}), not only weights"
        ) from err
    except Exception as err:  # a truncated or foreign file: one line, not a traceback
        raise ValueError(f"{path}: not a readable {kind} file ({type(err).__name__}: {one_line(err, 200)})") from err


def read_format_file(path: Path, kind: str, fmt: str) -> dict:
    """Load a self-contained file whose dictionary carries ``"format": fmt`` (on CPU).

    Raises:
        FileNotFoundError: no such file.
        ValueError: one line when the file is truncated, foreign, of another format or carries
            pickled code (:func:`load_weights`).
    """
    blob = load_weights(path, kind)
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise ValueError(f"{path}: not a {kind} file (expected format {fmt!r})")
    return blob


class FolderLockedError(RuntimeError):
    """Another process holds the writer lock of a folder."""


class WriterLock:
    """One writer per folder: an exclusive ``flock`` on ``FOLDER/.NAME.lock``, refused at once if held.

    Readers never take it, so they never block. The kernel drops the lock when its process dies
    (even by SIGKILL), so a killed run never leaves a stale lock. The lock file holds the owner's
    pid for the message. Use as a context manager, or :meth:`acquire` / :meth:`release`.

    Args:
        folder: the folder written (created if missing).
        name: which writer (``prepare-r000``, ``tokenize``, ``train``): writers of different
            names do not exclude each other.
    """

    def __init__(self, folder: str | os.PathLike, name: str) -> None:
        self.path = Path(folder) / f".{name}.lock"
        self._fh = None

    def acquire(self) -> WriterLock:
        """Take the lock.

        Raises:
            FolderLockedError: one line naming the folder and the owner's pid.
        """
        if self._fh is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise FolderLockedError(
                f"{self.path.parent}: another process (pid {owner}) is writing here ({self.path.name}); "
                "wait for it to finish or stop it"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
