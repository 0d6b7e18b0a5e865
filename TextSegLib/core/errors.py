"""TextSeg's exceptions.

:class:`TextSegError` is the base of every error TextSeg raises for something the user can fix: bad input, a model
that cannot be used, a file that cannot be written. Its message is one line that says what is wrong and what to
do. The ``textseg`` command, the worker service, the Slicer module and scripts decide "the user's problem" by this
class alone: anything else is a fault in TextSeg or a library under it and keeps its traceback. Subclasses also
derive from ``ValueError``, ``TypeError``, ``OSError`` or ``RuntimeError`` where that is what the error is, so
``except ValueError`` keeps working for library users.
"""

from __future__ import annotations

__all__ = [
    "OutputError",
    "PretrainedUnavailableError",
    "TextSegError",
    "TextSegTypeError",
    "TextSegValueError",
    "UsageError",
]


class TextSegError(Exception):
    """Base class of TextSeg's errors: bad input, a model that cannot be used, a file that cannot be written.

    The message is one line that names the problem and says what to do.
    """


class TextSegTypeError(TextSegError, TypeError):
    """A library function was given an argument of the wrong type."""


class TextSegValueError(TextSegError, ValueError):
    """A library function was given an argument with a value it cannot use."""


class UsageError(TextSegError, ValueError):
    """A command line that cannot be carried out as given (the ``textseg`` command names the option)."""


class OutputError(TextSegError, OSError):
    """An output that cannot be written (folder missing or read-only, disk full, an input in the way, ...)."""


class PretrainedUnavailableError(TextSegError, RuntimeError):
    """Pretrained weights a network's builder needs (a frozen backbone, say) cannot be loaded."""
