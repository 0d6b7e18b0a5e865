"""Every value a user sets for a segmentation run, validated in one place for every front end.

The command line, the worker service (its protocol), the web page, the Slicer panel and the engine call these
checks; none writes its own. Each raises a :class:`~TextSegLib.core.errors.TextSegError` subclass (also a
``TypeError`` or ``ValueError``) with one line that names the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from dataclasses import dataclass

import numpy as np

from TextSegLib.core.errors import TextSegError, TextSegTypeError, TextSegValueError

__all__ = [
    "COMPONENTS",
    "MAX_TEXT_CHARACTERS",
    "PromptError",
    "check_components",
    "check_port",
    "check_positive_number",
    "check_text",
    "check_threshold",
    "validate_prompt",
]


class PromptError(TextSegError, ValueError):
    """A prompt that cannot be used (empty, blank, too long, not text, or without a single letter or digit)."""


_EXAMPLE = '"a large soft-tissue mass in the posterior left lower lung"'

MAX_TEXT_CHARACTERS = 1000
"""The longest prompt or segment name, in characters: text encoders read the first 77 to 512 tokens (a few hundred
words at most), so a longer text is a mistake (a file pasted in), not a description."""


def _shown(text: str, limit: int = 40) -> str:
    """``text`` quoted for a message, cut to ``limit`` characters."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


def check_text(text: str, what: str, error: type[TextSegError] = TextSegValueError) -> None:
    """Raise ``error`` when ``text`` (a prompt or a name) holds bytes that were not UTF-8 (Python keeps them as
    lone surrogates, as the command line's arguments do), a control character other than white space (an escape, a
    bell, a NUL), or more than :data:`MAX_TEXT_CHARACTERS` characters. The message names ``what`` and echoes at
    most 40 characters."""
    if len(text) > MAX_TEXT_CHARACTERS:
        raise error(f"The {what} {_shown(text)} has {len(text)} characters; the limit is {MAX_TEXT_CHARACTERS}: "
                    "describe the structure in a sentence or two.")
    if any("\ud800" <= character <= "\udfff" for character in text):
        try:  # the bytes the command line was given (kept as surrogates), shown as \xff
            raw = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "backslashreplace")
        shown = raw.decode("utf-8", "backslashreplace")
        raise error(f"The {what} '{shown[:40]}{'...' if len(shown) > 40 else ''}' holds bytes that are not UTF-8 "
                    "text; type it again in a UTF-8 terminal (or decode it with its real encoding).")
    control = next((c for c in text if unicodedata.category(c) == "Cc" and not c.isspace()), None)
    if control is not None:
        raise error(f"The {what} {_shown(text)} holds a control character (U+{ord(control):04X}); give plain text.")


def validate_prompt(prompt: object) -> str:
    """Return the prompt with its white space (line breaks and tabs too) normalised. Raises :class:`PromptError`
    for an empty or blank prompt, for one without a letter or digit in any script (only punctuation or symbols) and
    for the problems :func:`check_text` names, and :class:`~TextSegLib.core.errors.TextSegTypeError` for anything
    but a ``str`` (decode bytes first)."""
    if isinstance(prompt, bytes | bytearray):
        raise TextSegTypeError("The prompt is bytes; give it as text (str), for example prompt.decode('utf-8').")
    if not isinstance(prompt, str):
        raise TextSegTypeError(f"The prompt must be text (str), not {type(prompt).__name__}.")
    check_text(prompt, "prompt", PromptError)
    if not prompt.strip():
        raise PromptError(f"The prompt is empty: type what to segment, for example {_EXAMPLE}.")
    if not any(character.isalnum() for character in prompt):
        raise PromptError(
            f"The prompt {prompt.strip()[:40]!r} has no words, only punctuation or symbols: describe what to "
            f"segment, for example {_EXAMPLE}."
        )
    return " ".join(prompt.split())


THRESHOLD_STEP = 0.01
"""The finest threshold a widget offers; widgets range from it to ``1 - THRESHOLD_STEP``, inside the library's
open interval (0, 1)."""
MODALITIES = ("CT", "MR")
DEVICES = ("auto", "cpu", "cuda")
"""The devices a user names; ``"cuda:N"`` picks one GPU of several."""
_CUDA_INDEX = re.compile(r"cuda:\d+")


def check_threshold(threshold: object) -> float:
    """Return ``threshold`` as a float if it lies strictly between 0 and 1; else raise ``TypeError``/``ValueError``
    (:class:`~TextSegLib.core.errors.TextSegError` subclasses)."""
    if isinstance(threshold, bool) or not isinstance(threshold, int | float | np.floating | np.integer):
        raise TextSegTypeError(f"The threshold must be a number between 0 and 1, not {type(threshold).__name__}.")
    if not 0 < threshold < 1:  # compared as given: float() of a huge integer overflows, NaN compares false
        shown = str(threshold) if len(str(threshold)) <= 20 else f"{str(threshold)[:20]}..."
        raise TextSegValueError(f"The threshold must lie between 0 and 1 (a probability), not {shown}.")
    return float(threshold)


def check_batch_size(batch_size: object) -> int | None:
    """Return ``batch_size`` (slices per forward pass) if it is None (automatic) or a whole number of at least 1;
    else raise ``TypeError``/``ValueError`` (:class:`~TextSegLib.core.errors.TextSegError` subclasses)."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TextSegTypeError(f"The batch size must be a whole number, not {type(batch_size).__name__}.")
    if batch_size < 1:
        raise TextSegValueError(f"The batch size must be at least 1 (or automatic), not {batch_size}.")
    return int(batch_size)


def check_modality(modality: object) -> str | None:
    """Return ``modality`` if it is ``"CT"``, ``"MR"`` or None (guess it from the intensities); else raise
    :class:`~TextSegLib.core.errors.TextSegValueError`."""
    if modality is not None and modality not in MODALITIES:
        raise TextSegValueError(f"The modality must be 'CT', 'MR' or None (guess it), not {modality!r}.")
    return modality


def check_device(device: object) -> str:
    """Return ``device`` if it is ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; else raise
    :class:`~TextSegLib.core.errors.TextSegValueError`. Whether this computer has that device is decided when a
    run starts (:mod:`TextSegLib.engine.devices`)."""
    if not isinstance(device, str) or not (device in DEVICES or _CUDA_INDEX.fullmatch(device)):
        raise TextSegValueError(f"Unknown device {device!r}: use auto, cpu, cuda or cuda:N (N the GPU's number).")
    return device


def check_port(port: object) -> int:
    """Return ``port`` if it is a whole number from 0 (pick a free one) to 65535; else raise
    :class:`~TextSegLib.core.errors.TextSegValueError`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise TextSegValueError(f"{port} is not a port number; give one from 1 to 65535 (0 picks a free one).")
    return port


def check_positive_number(value: object, unit: str, whole: bool = False) -> float:
    """Return ``value`` if it is a finite number above 0 (a whole one with ``whole``); else raise
    :class:`~TextSegLib.core.errors.TextSegValueError` naming ``unit`` ("megabytes", "seconds", ...)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
        raise TextSegValueError(f"{value!r} is not a {'whole ' if whole else ''}number of {unit}.")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        finite = False
    if not (finite and value > 0):
        shown = str(value) if len(str(value)) <= 20 else f"{str(value)[:20]}..."
        raise TextSegValueError(f"{shown} is not a positive {'whole ' if whole else ''}number of {unit}.")
    return value


COMPONENTS = ("all", "largest")


def check_components(value: object) -> str:
    """``value`` if it is one of :data:`COMPONENTS` (which connected parts of a mask are kept)."""
    if value not in COMPONENTS:
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:40]}..."
        raise TextSegValueError(f"components {shown} is not one of {', '.join(COMPONENTS)}: 'all' keeps every "
                                "part of the mask, 'largest' only its largest connected part.")
    return value


@dataclass(frozen=True)
class SegmentOptions:
    """How one segmentation runs, besides the volume, the prompt and the models: every front end builds one and
    calls :meth:`checked`.

    Attributes:
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        batch_size: slices per forward pass; None chooses one.
        threshold: probability above which a voxel is inside; None takes the model's.
        probability: also return the probability volume.
        modality: ``"CT"``, ``"MR"`` or None (from the file, else guessed from the intensities).
        fp32: compute in float32 also where reduced precision is available.
        compile: run the networks through ``torch.compile``.
        components: ``"all"`` keeps every connected part of the mask, ``"largest"`` only the largest (an organ that
            is one piece, without stray voxels elsewhere); None takes the model's.
    """

    device: str = "auto"
    batch_size: int | None = None
    threshold: float | None = None
    probability: bool = False
    modality: str | None = None
    fp32: bool = False
    compile: bool = False
    components: str | None = None

    def checked(self) -> SegmentOptions:
        """These options with every value checked (a :class:`~TextSegLib.core.errors.TextSegError` names the first
        bad one)."""
        for name in ("probability", "fp32", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise TextSegTypeError(f"{name} must be true or false, not {getattr(self, name)!r}.")
        return dataclasses.replace(
            self,
            device=check_device(self.device),
            batch_size=check_batch_size(self.batch_size),
            threshold=None if self.threshold is None else check_threshold(self.threshold),
            modality=check_modality(self.modality),
            components=None if self.components is None else check_components(self.components),
        )
