"""Writing outputs safely.

- :func:`atomic_write` writes one file through a hidden temporary file beside it; :class:`OutputTransaction`
  writes several so that either all of them are put in place or none is (``textseg segment`` and
  ``textseg evaluate`` write through one transaction).
- :func:`check_writable` finds out before any work starts whether a file can be created where it is asked for.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from TextSegLib.core.errors import OutputError
from TextSegLib.core.messages import first_line

__all__ = [
    "OutputTransaction",
    "atomic_write",
    "check_writable",
]


def _temporary_name(path: Path) -> str:
    """A new hidden temporary file beside ``path`` that keeps its extension (writers pick the format from it)."""
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith((".seg.nrrd", ".nii.gz")) else path.suffix
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    return temporary


def _write_failed(path: Path, error: BaseException) -> OutputError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else first_line(error)
    return OutputError(f"Cannot write {str(path)!r}: {reason}. Free some space or choose another output.")


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(temporary_path)`` and rename the result onto ``path``, so a failure (or an interrupt) leaves no
    partial file and an existing file is replaced only by a complete one. A failed write raises
    :class:`OutputError`; the folder is created when it is missing."""
    with OutputTransaction() as transaction:
        transaction.add(path, write)


class OutputTransaction:
    """Several output files written all or none.

    ``add(path, write)`` writes each file at once, but to a hidden temporary file beside its target; ``commit()``
    (called on leaving the ``with`` block without an exception) renames them onto their targets. Any exception
    (a failed write, ``KeyboardInterrupt``, a signal turned into an exception) before or during the commit removes
    every temporary file, takes back the targets already renamed (an existing file that was being replaced is put
    back) and removes the folders the transaction created. Failed writes raise :class:`OutputError`.
    """

    def __init__(self) -> None:
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
                if target.exists():
                    backup = _temporary_name(target)
                    os.replace(target, backup)
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
            if isinstance(error, OSError):
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
