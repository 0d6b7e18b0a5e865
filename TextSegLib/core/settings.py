"""The environment variables TextSeg reads and its default network settings, each written once.

Every front end (the command line, the worker service, the web page, the Slicer module) reads these through the
functions here, never ``os.environ`` directly, so one variable has one meaning everywhere.

=======================  ================================================================================
``TEXTSEG_TOKEN``         the worker service's token (``textseg serve``, ``textseg segment --server``,
                          ``textseg web --server``) when ``--token`` is not given
``TEXTSEG_MODELS_DIR``    the folder of imported models; default ``$XDG_DATA_HOME/textseg/models``
                          (``~/.local/share/textseg/models``)
``TEXTSEG_DEBUG_PAUSE``   a testing aid of ``textseg segment``: ``reading``, ``segmenting`` or ``writing``
``TEXTSEG_THREADS``       threads a run computes with when ``--threads`` is not given
                          (:mod:`TextSegLib.core.threads`)
``XDG_CACHE_HOME``        the folder of TextSeg's cache (``textseg``: the CPU batch sizes chosen); default
                          ``~/.cache``
=======================  ================================================================================
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

__all__ = [
    "DEBUG_PAUSE_VARIABLE",
    "DEFAULT_HOST",
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_MAX_REQUEST_MB",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_RESULT_TTL",
    "MODELS_DIR_VARIABLE",
    "SERVE_PORT",
    "THREADS_VARIABLE",
    "TOKEN_VARIABLE",
    "WEB_PORT",
    "debug_pause",
    "environment_token",
    "is_loopback",
    "user_cache_dir",
    "user_models_dir",
]

TOKEN_VARIABLE = "TEXTSEG_TOKEN"
MODELS_DIR_VARIABLE = "TEXTSEG_MODELS_DIR"
DEBUG_PAUSE_VARIABLE = "TEXTSEG_DEBUG_PAUSE"
THREADS_VARIABLE = "TEXTSEG_THREADS"

#: Where ``textseg serve`` and ``textseg web`` listen unless told otherwise: this computer only.
DEFAULT_HOST = "127.0.0.1"
#: ``textseg serve``'s port.
SERVE_PORT = 8765
#: ``textseg web``'s port.
WEB_PORT = 8780
#: The largest request ``textseg serve`` accepts by default (a 512 x 512 x 1000 CT in float64 is 2 GB).
DEFAULT_MAX_REQUEST_MB = 2048
#: Jobs ``textseg serve`` holds waiting by default (each holds its volume); more are refused with 503.
DEFAULT_MAX_QUEUED = 16
#: Seconds a request's headers may take to reach ``textseg serve``, and its body besides one per megabyte.
DEFAULT_READ_TIMEOUT = 60.0
#: Seconds ``textseg serve`` keeps a finished job's result for its client by default.
DEFAULT_RESULT_TTL = 600.0


def environment_token() -> str | None:
    """The token in ``$TEXTSEG_TOKEN``, or None when it is unset or empty."""
    return os.environ.get(TOKEN_VARIABLE) or None


def user_models_dir() -> Path:
    """Folder of models the user imported: ``$TEXTSEG_MODELS_DIR``, else ``$XDG_DATA_HOME/textseg/models``
    (``~/.local/share/textseg/models``)."""
    if os.environ.get(MODELS_DIR_VARIABLE):
        return Path(os.environ[MODELS_DIR_VARIABLE]).expanduser()
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "textseg" / "models"


def user_cache_dir() -> Path:
    """Folder of what TextSeg remembers between runs and may lose at any time: ``$XDG_CACHE_HOME/textseg``
    (``~/.cache/textseg``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "textseg"


def debug_pause() -> str:
    """The stage at which ``textseg segment`` pauses for tests (``$TEXTSEG_DEBUG_PAUSE``), "" when unset."""
    return os.environ.get(DEBUG_PAUSE_VARIABLE, "")


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this computer only (127.0.0.0/8, ::1, localhost): a service listening there needs no
    token, and a page served there is reachable from this computer alone."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
