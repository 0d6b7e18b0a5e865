"""Short messages: the first line of an exception, a fault named in one line, mismatched weight keys, and keys
a reader does not know."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "describe_fault",
    "describe_key_problems",
    "first_line",
    "unknown_keys",
]


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can run to pages)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_fault(error: BaseException) -> str:
    """``"KeyError: 'spacing'"``: an exception that is not a :class:`~TextSegLib.core.errors.TextSegError` (a fault
    in TextSeg or a library under it) in one line, its type first; only the type when it has no message."""
    text = str(error).strip()
    name = type(error).__name__
    return f"{name}: {text.splitlines()[0]}" if text else name


def describe_key_problems(groups: Iterable[tuple[str, list[str]]], shown: int = 5) -> str:
    """``"2 missing (a, b); 1 unexpected (c)"`` for the non-empty ``(label, keys)`` groups of a weights mismatch,
    naming at most ``shown`` keys per group."""
    problems = []
    for label, keys in groups:
        if keys:
            listed = ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")
            problems.append(f"{len(keys)} {label} ({listed})")
    return "; ".join(problems)


def unknown_keys(given: Iterable[str], known: Iterable[str], what: str) -> str | None:
    """``"<what>: a, b (known: c, d)"`` naming the keys of ``given`` that are not ``known``, both sorted; None when
    every key is known. Config files, checkpoint configs and worker requests name their unknown keys with it, each
    in its own exception."""
    known = sorted(set(known))
    unknown = sorted(set(given) - set(known))
    if not unknown:
        return None
    return f"{what}: {', '.join(unknown)} (known: {', '.join(known)})"
