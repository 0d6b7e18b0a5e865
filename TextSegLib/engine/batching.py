"""The CPU batch size: :class:`BatchTuner` times it at the start of a run, :class:`BatchSizeCache` remembers the
choice between runs. Only the standard library: the cache is read and written without torch."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from TextSegLib.core.errors import TextSegError
from TextSegLib.core.files import atomic_write
from TextSegLib.core.messages import first_line
from TextSegLib.core.settings import user_cache_dir

__all__ = [
    "BatchSizeCache",
    "BatchTuner",
]

log = logging.getLogger("textseg")


class BatchTuner:
    """Chooses the CPU batch size by timing real batches at the start of a run.

    Each candidate size (1, 2, 4, 8, in that order) computes two batches; the second is timed, because the first at
    a new shape also pays oneDNN's set-up for it. The first candidate that is slower per slice than the best so far
    ends the search (larger batches only add to the feature maps that no longer fit the cache), as does the last
    candidate. The slices are part of the volume, so nothing is computed twice; a volume too short to finish the
    search leaves it where it stopped, and the next run (the model keeps its tuner) goes on from there.
    """

    CANDIDATES = (1, 2, 4, 8)

    def __init__(self) -> None:
        self._index = 0
        self._timed = False
        self._best: tuple[float, int] | None = None  # (seconds per slice, size)
        self.finished = False

    @classmethod
    def remembered(cls, size: int) -> BatchTuner:
        """A tuner whose choice is ``size`` (one of :attr:`CANDIDATES`), made by an earlier run."""
        tuner = cls()
        tuner._best = (0.0, size)
        tuner._index = len(cls.CANDIDATES)
        tuner.finished = True
        return tuner

    @property
    def size(self) -> int:
        """The batch size to run next (the chosen one once :attr:`finished`)."""
        return self._best[1] if self.finished and self._best else self.CANDIDATES[self._index]

    def record(self, slices: int, seconds: float) -> bool:
        """Report that a batch of ``slices`` took ``seconds``; True when this report completed the choice."""
        if self.finished or slices != self.CANDIDATES[self._index]:
            return False  # done already, or a volume's last, shorter batch, which says nothing about the size
        if not self._timed:
            self._timed = True
            return False
        per_slice = seconds / slices
        slower = self._best is not None and per_slice >= self._best[0]
        if not slower:
            self._best = (per_slice, slices)
        self._index += 1
        self._timed = False
        self.finished = slower or self._index == len(self.CANDIDATES)
        return self.finished


class BatchSizeCache:
    """The CPU batch sizes :class:`BatchTuner` chose, remembered between runs in one small JSON file
    (``$XDG_CACHE_HOME/textseg/cpu-batch-sizes.json``, else ``~/.cache/textseg/...``), so that a fresh process
    computes at the chosen size from its first slice instead of timing four sizes again.

    The engine's key names the model (id and weights digest), the precision, compilation, the thread count and the
    slice size. The file is only a cache: one that cannot be read, is damaged or holds something else is ignored
    (and replaced at the next write), and one that cannot be written is left alone; neither fails a run. Writes
    re-read the file and replace it atomically (a temporary file renamed onto it), under a lock where the system
    has ``fcntl``, so runs that finish together keep each other's entries and never leave a half-written file.
    Deleting the file makes the next run time its batch size again.
    """

    FILE_NAME = "cpu-batch-sizes.json"
    MAX_ENTRIES = 256

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else user_cache_dir() / self.FILE_NAME

    def _entries(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {key: size for key, size in data.items()
                if type(size) is int and size in BatchTuner.CANDIDATES}

    def get(self, key: str) -> int | None:
        """The size remembered for ``key``, or None."""
        return self._entries().get(key)

    @contextlib.contextmanager
    def _locked(self):
        try:
            import fcntl
        except ImportError:  # Windows: the atomic replace alone keeps the file whole
            yield
            return
        with open(self.path.with_name(self.path.name + ".lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def put(self, key: str, size: int) -> None:
        """Remember ``size`` for ``key`` (the oldest entries go beyond :attr:`MAX_ENTRIES`); a file that cannot be
        written is only logged."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._locked():
                entries = self._entries()
                entries.pop(key, None)
                entries[key] = size
                kept = dict(list(entries.items())[-self.MAX_ENTRIES:])
                text = json.dumps(kept, indent=1, sort_keys=False)
                atomic_write(self.path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
        except (OSError, TextSegError) as error:
            log.info("The CPU batch size was not remembered (%s): %s", self.path, first_line(error))
