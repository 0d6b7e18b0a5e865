"""How many threads a run computes with, decided once per process before torch is imported.

PyTorch sizes its thread pool to every core of the computer and its OpenMP threads spin while they wait for work.
Two runs that share the CPU (3D Slicer's worker and a ``textseg segment``, two batch jobs) then fight over it: a
spinning thread holds a core that the other run's threads need, and each run waits on its slowest thread. TextSeg's
policy, applied by every ``textseg`` command that computes in its process (``segment``, ``evaluate``, ``demo``,
``serve``, which 3D Slicer's worker is) and by :class:`~TextSegLib.engine.run.Segmenter` once
:func:`configure` ran:

1. The number of intra-op threads is the first of: the ``--threads`` option, ``$TEXTSEG_THREADS``,
   ``$OMP_NUM_THREADS`` (its first number), and the CPUs this process may use: those its affinity mask allows
   (``taskset``, a container's ``--cpuset-cpus``), at most its cgroup CPU quota (``docker --cpus``, a Kubernetes
   limit; cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), rounded down and at least one.
2. Threads that wait sleep instead of spinning: ``OMP_WAIT_POLICY=PASSIVE`` and ``KMP_BLOCKTIME=0`` are set in the
   environment before torch is imported, unless the user set them.
3. The inter-op pool (used by none of TextSeg's work) gets one thread.

Only the standard library is used, so the command line decides all this without loading torch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from TextSegLib.core.errors import UsageError
from TextSegLib.core.settings import THREADS_VARIABLE

__all__ = [
    "PASSIVE_WAITING",
    "available_cpus",
    "cgroup_cpu_limit",
    "configure",
    "configured_threads",
    "thread_count",
]

#: What :func:`configure` sets in the environment when the user did not: OpenMP threads that wait sleep at once
#: (GNU OpenMP, which PyTorch uses, reads the first; Intel's OpenMP the second).
PASSIVE_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_CGROUP = Path("/proc/self/cgroup")

_configured: int | None = None


def _quota(quota: str, period: str) -> float | None:
    """CPUs granted by a quota and a period in microseconds (``"max"`` or a negative quota: no limit)."""
    if quota in ("max", "-1") or not quota.lstrip("-").isdigit() or not period.isdigit():
        return None
    quota_us, period_us = int(quota), int(period)
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT, proc_cgroup: Path = _PROC_CGROUP) -> float | None:
    """The CPUs this process's cgroup may use per unit of time (``1.5`` for ``docker --cpus 1.5``), or None when no
    quota limits it or the files cannot be read.

    The process's own cgroup is read from ``proc_cgroup`` (``/proc/self/cgroup``) and looked up under ``root``;
    where that folder is not mounted (a container sees its own cgroup at the root) the root's files are read.
    cgroup v2: ``cpu.max`` holds ``"<quota> <period>"`` or ``"max <period>"``. cgroup v1: the ``cpu`` controller's
    ``cpu.cfs_quota_us`` (``-1``: none) and ``cpu.cfs_period_us``."""
    lines = (_read(proc_cgroup) or "").splitlines()
    limits = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            folders = [root / relative.lstrip("/"), root]
            names = ("cpu.max",)
        elif "cpu" in controllers.split(","):
            mounts = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
            folders = [folder for mount in mounts for folder in (mount / relative.lstrip("/"), mount)]
            names = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        for folder in folders:
            texts = [_read(folder / name) for name in names]
            if None in texts:
                continue
            fields = texts[0].split() if len(texts) == 1 else texts
            if len(fields) == 2:
                limit = _quota(*fields)
                if limit is not None:
                    limits.append(limit)
            break
    return min(limits) if limits else None


def available_cpus(root: Path = _CGROUP_ROOT, proc_cgroup: Path = _PROC_CGROUP) -> int:
    """The CPUs this process may use: those its affinity mask allows, at most its cgroup quota rounded down, and
    at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity masks on this system (macOS, Windows)
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


def _positive(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def thread_count(option: int | None = None, environment: dict[str, str] | None = None,
                 cpus: int | None = None) -> tuple[int, str]:
    """``(threads, where the number comes from)``: ``option`` (``--threads``), else ``$TEXTSEG_THREADS``, else the
    first number of ``$OMP_NUM_THREADS`` (``"4,2"`` -> 4; a value that is no number is ignored, as OpenMP ignores
    it), else ``cpus`` (default: :func:`available_cpus`).

    Raises :class:`~TextSegLib.core.errors.UsageError` for an option or ``$TEXTSEG_THREADS`` that is not a whole
    number of at least one."""
    environment = os.environ if environment is None else environment
    if option is not None:
        if isinstance(option, bool) or not isinstance(option, int) or option < 1:
            raise UsageError(f"--threads must be a whole number of at least 1, not {option!r}.")
        return option, "--threads"
    text = environment.get(THREADS_VARIABLE, "")
    if text.strip():
        threads = _positive(text)
        if threads is None:
            raise UsageError(f"${THREADS_VARIABLE} must be a whole number of at least 1, not {text!r}; unset it "
                             "to use every CPU this process may use.")
        return threads, f"${THREADS_VARIABLE}"
    omp = _positive(environment.get("OMP_NUM_THREADS", "").split(",")[0])
    if omp is not None:
        return omp, "$OMP_NUM_THREADS"
    return (cpus if cpus is not None else available_cpus()), "the CPUs this process may use"


def configure(option: int | None = None, environment: dict[str, str] | None = None) -> int:
    """Decide this process's thread count (:func:`thread_count`) and make OpenMP's waiting threads sleep
    (:data:`PASSIVE_WAITING`, where ``environment`` (default ``os.environ``) does not set them). Call it before
    torch is imported; :class:`~TextSegLib.engine.run.Segmenter` then sizes torch's pools to the number returned."""
    global _configured
    environment = os.environ if environment is None else environment
    threads, _ = thread_count(option, environment)
    for name, value in PASSIVE_WAITING.items():
        environment.setdefault(name, value)
    _configured = threads
    return threads


def configured_threads() -> int | None:
    """The thread count :func:`configure` decided in this process, None when it was not called."""
    return _configured
