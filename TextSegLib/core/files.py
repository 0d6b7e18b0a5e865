"""Writing outputs safely, and reading only plain files.

- :func:`atomic_write` writes one file through a hidden temporary file beside it; :class:`OutputTransaction`
  writes several so that either all of them are put in place or none is (``textseg segment`` and
  ``textseg evaluate`` write through one transaction). Without ``overwrite`` a target is put in place with a hard
  link (or an exclusive create), which never replaces a file: of two runs writing the same file at once, one wins
  and the other says that the file appeared meanwhile.
- Temporary files are named ``.<target>.<pid>@<host>-<random>.tmp<ext>``; one whose process is no longer running on
  this computer (a run that was killed) is removed, with a warning, when the next run writes that target.
- :func:`check_writable` finds out before any work starts whether a file can be created where it is asked for.
- :func:`check_readable_file` refuses what is not a plain file (a FIFO, a device, a socket) before anything opens
  it: reading a FIFO waits for a writer for ever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import resource
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from TextSegLib.core.errors import OutputError, TextSegValueError
from TextSegLib.core.messages import first_line

__all__ = [
    "OutputTransaction",
    "atomic_write",
    "check_readable_file",
    "check_writable",
    "remove_stale_temporaries",
]

log = logging.getLogger("textseg")

_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32] or "host"


def _extension(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith((".seg.nrrd", ".nii.gz")) else path.suffix


def _temporary_name(path: Path, kind: str = "tmp") -> str:
    """A new hidden temporary file beside ``path`` that keeps its extension (writers pick the format from it) and
    names this process (so that a later run can tell a killed run's file from a running one's)."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}-",
                                         suffix=f".{kind}{_extension(path)}", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    return temporary


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files of ``path`` left by runs on this computer that were killed (their process is
    gone); return them. Backups of replaced files (``.bak``) are never removed, nor another computer's files."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)@{re.escape(_HOST)}-[A-Za-z0-9_]+\.tmp"
                         rf"{re.escape(_extension(path))}")
    removed = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for name in names:
        match = pattern.fullmatch(name)
        if match and not _running(int(match.group(1))):
            with contextlib.suppress(OSError):
                os.unlink(path.parent / name)
                removed.append(path.parent / name)
                log.warning("Removed %s, a temporary file left by an interrupted run (process %s).",
                            path.parent / name, match.group(1))
    return removed


def _reason(error: BaseException, folder: Path) -> str:
    """Why a write failed, and what to do, for a user: from the error number, or for SimpleITK's errors (which
    carry none, only its source file's path) from the disk's free space and this process's file size limit."""
    number = error.errno if isinstance(error, OSError) else None
    if number is None and not isinstance(error, OSError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                number = errno.ENOSPC
        if number is None and resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            number = errno.EFBIG
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (or your quota used up); free some space or choose another output"
    if number == errno.EFBIG:
        return ("the file is larger than the file system or this process's limit (ulimit -f) allows; choose another "
                "output")
    if number in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (f"the folder {str(folder)!r} is not writable ({os.strerror(number)}); choose another folder or "
                "change its permissions")
    if number in (errno.ENOTDIR, errno.EEXIST):
        return f"a file is in the way of the folder {str(folder)!r}; move it or choose another folder"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}; choose another output"
    return "the image writer failed; check the disk and the file system, or choose another output"


def _write_failed(path: Path, error: BaseException) -> OutputError:
    if isinstance(error, OutputError) and error.__cause__ is not None:  # a nested atomic write: its cause
        error = error.__cause__
    return OutputError(f"Cannot write {str(path)!r}: {_reason(error, path.parent)}.")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call ``write(temporary_path)`` and rename the result onto ``path``, so a failure (or an interrupt) leaves no
    partial file and an existing file is replaced only by a complete one (``overwrite=False``: never replaced; a file
    that exists by then raises :class:`OutputError`). A failed write raises :class:`OutputError`; the folder is
    created when it is missing."""
    with OutputTransaction(overwrite) as transaction:
        transaction.add(path, write)


class OutputTransaction:
    """Several output files written all or none.

    ``add(path, write)`` writes each file at once, but to a hidden temporary file beside its target; ``commit()``
    (called on leaving the ``with`` block without an exception) renames them onto their targets (with
    ``overwrite=False`` it links them there instead, which fails rather than replace a file that appeared since the
    run checked its outputs: :class:`OutputError` "appeared meanwhile"). Any exception
    (a failed write, ``KeyboardInterrupt``, a signal turned into an exception) before or during the commit removes
    every temporary file, takes back the targets already renamed (an existing file that was being replaced is put
    back) and removes the folders the transaction created. Failed writes raise :class:`OutputError`.
    """

    def __init__(self, overwrite: bool = True) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[Path, str]] = []
        self._created_folders: list[Path] = []
        self.committed: list[Path] = []

    def __enter__(self) -> OutputTransaction:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.commit()
        else:
            self.rollback()

    @property
    def paths(self) -> list[Path]:
        """Targets added so far, in order."""
        return [target for target, _ in self._staged]

    def _make_folder(self, folder: Path) -> None:
        missing = []
        for parent in (folder, *folder.parents):
            if parent.exists():
                break
            missing.append(parent)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _write_failed(folder, error) from error
        self._created_folders.extend(reversed(missing))

    def add(self, path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
        """Write one output (to its temporary file) with ``write(temporary_path)``."""
        path = Path(path)
        if any(target == path for target, _ in self._staged):
            raise OutputError(f"{str(path)!r} would be written twice; give distinct output names.")
        self._make_folder(path.parent)
        remove_stale_temporaries(path)
        try:
            temporary = _temporary_name(path)
        except OSError as error:
            raise _write_failed(path, error) from error
        self._staged.append((path, temporary))
        try:
            write(temporary)
        except (OSError, RuntimeError) as error:  # SimpleITK reports failed writes as RuntimeError
            raise _write_failed(path, error) from error

    def commit(self) -> None:
        """Put every staged file in place; on any failure take back what was done and raise."""
        backups: list[tuple[Path, str]] = []
        try:
            for target, temporary in self._staged:
                if not self.overwrite:
                    _place_new(temporary, target)
                    self.committed.append(target)
                    continue
                if target.exists():
                    backup = _temporary_name(target, "bak")
                    _keep_aside(target, backup)
                    backups.append((target, backup))
                os.replace(temporary, target)
                self.committed.append(target)
        except BaseException as error:
            for target in self.committed:
                _remove(target)
            for target, backup in backups:
                os.replace(backup, target)
            self.committed = []
            self.rollback()
            if isinstance(error, OSError) and not isinstance(error, OutputError):
                raise _write_failed(target, error) from error
            raise
        for _, backup in backups:
            _remove(backup)
        self._staged = []

    def rollback(self) -> None:
        """Remove every temporary file and the folders this transaction created (when they are empty)."""
        for _, temporary in self._staged:
            _remove(temporary)
        self._staged = []
        for folder in reversed(self._created_folders):
            try:
                folder.rmdir()
            except OSError:
                break
        self._created_folders = []


def _keep_aside(target: Path, backup: str) -> None:
    """Keep the file being replaced as ``backup``: a hard link, so that ``target`` never disappears and a reader
    sees either the old or the new file (the replace that follows is atomic); a rename where the file system has no
    hard links. ``backup`` is the name :func:`_temporary_name` reserved for this process."""
    os.unlink(backup)
    try:
        os.link(target, backup)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        os.replace(target, backup)


def _place_new(temporary: str, target: Path) -> None:
    """Put ``temporary`` in place as ``target`` unless ``target`` exists: a hard link (atomic, never replaces), or
    where the file system has none an exclusive create of ``target`` followed by a rename onto it."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise _appeared(target) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            raise _appeared(target) from None
        os.replace(temporary, target)
        return
    os.unlink(temporary)


def _appeared(target: Path) -> OutputError:
    return OutputError(f"{str(target)!r} appeared while TextSeg was working (another run writing the same file?); it "
                       "was left as it is and nothing was written.")


def _remove(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def check_writable(path: str | os.PathLike[str], what: str = "output") -> None:
    """Raise :class:`OutputError` unless a file ``path`` could be created now: its folder (or the nearest folder
    that exists, where the rest would be created) must be a folder in which a file can be made. Tried with a real,
    at once removed, hidden file, so that a read-only file system or folder is found also for root."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"The {what} {str(path)!r} is a folder; give a file name.")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"Cannot write the {what} {str(path)!r}: {str(folder)!r} is a file, not a folder.")
    try:
        handle, probe = tempfile.mkstemp(prefix=".textseg-write-check.", dir=folder)
    except OSError as error:
        raise OutputError(
            f"Cannot write the {what} {str(path)!r}: the folder {str(folder)!r} is not writable "
            f"({error.strerror or first_line(error)}); choose another folder."
        ) from error
    os.close(handle)
    os.unlink(probe)


def check_readable_file(path: str | os.PathLike[str], what: str = "file") -> None:
    """Raise :class:`~TextSegLib.core.errors.TextSegValueError` when ``path`` exists but is neither a plain file
    nor a folder (a FIFO, a device, a socket): opening a FIFO waits for a writer for ever. Missing paths and folders
    are left to the caller, which says what it wanted."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a plain file")
    raise TextSegValueError(f"The {what} {str(path)!r} is {kind}, not a file; give a file saved on disk.")
