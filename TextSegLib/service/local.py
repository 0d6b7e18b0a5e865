"""The worker process this computer starts: :class:`LocalWorker`, as 3D Slicer and ``textseg web`` use it, and
:func:`shared_worker`, which hands every caller the same client, so one worker and its loaded models serve every run.

The networks never run in the process that asks for a segmentation. 3D Slicer's main thread holds Python's GIL
while it idles in the Qt event loop, so a Python thread there barely runs; a separate process runs at full speed,
keeps its models and encoded prompts loaded between runs, and can crash or run out of memory without taking Slicer
down. The worker is ``textseg serve`` (:mod:`TextSegLib.service.server`): started on this computer by
:class:`LocalWorker` (loopback address, a random token, stopped when its parent exits), or run by hand on a GPU
server and reached with :class:`~TextSegLib.service.client.RemoteWorker`. Both speak the protocol of
:mod:`TextSegLib.service.protocol`.

Only the standard library and the client are used here, so 3D Slicer's process starts its worker without torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from TextSegLib.core.settings import DEFAULT_HOST, TOKEN_VARIABLE
from TextSegLib.core.threads import PASSIVE_WAITING
from TextSegLib.service.client import POLL_TIMEOUT, ImportedModel, RemoteWorker
from TextSegLib.service.protocol import READY_LINE, WorkerError, WorkerUnreachableError

__all__ = [
    "LocalWorker",
    "shared_worker",
    "stop_local_workers",
]


# Checking a large checkpoint fully (weights included) on a slow disk: generous, but a hung import still ends.
IMPORT_TIMEOUT = 600.0
# What `textseg import` prints when it has copied a checkpoint (TextSegLib.app.commands.cmd_import).
_IMPORTED = re.compile(r"Imported (?P<id>\S+) \(.*\) to (?P<path>.+)")
_ERROR_PREFIX = "textseg: error: "


@dataclass
class _Process:
    popen: subprocess.Popen
    log: Path
    environment: dict[str, str]
    url: str = ""


class LocalWorker(RemoteWorker):
    """``textseg serve`` on this computer, started on first use and kept until :meth:`stop` or this process ends.

    The worker listens on 127.0.0.1 at a free port with a random token, writes its log to a temporary file, and
    exits when its standard input closes (that is, when the process that started it ends, however it ends). When
    it dies (killed, out of memory), the next call says so once and the call after it starts a fresh worker.

    Args:
        python: the Python that runs the worker (3D Slicer: its ``PythonSlicer`` executable).
        environment: extra environment variables for the worker.
        startup_timeout: seconds to wait for the worker to listen.
    """

    def __init__(self, python: str | None = None, environment: dict[str, str] | None = None,
                 startup_timeout: float = 120.0) -> None:
        self.python = python or sys.executable
        self.environment = dict(environment or {})
        self.startup_timeout = startup_timeout
        self.url = ""
        self.token = secrets.token_urlsafe(24)
        self._process: _Process | None = None
        # Two threads may need the worker at once (3D Slicer's panel lists the models and starts a run on background
        # threads): one starts it, the other waits for it.
        self._starting = threading.Lock()

    def describe(self) -> str:
        return "the TextSeg worker process"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.popen.pid if self.running else None

    def start(self) -> None:
        """Start the worker (if it is not running) and wait until it listens; safe to call from several threads."""
        if self.running:
            return
        with self._starting:
            if not self.running:
                self._start()

    def _start(self) -> None:
        self._process = None
        log = Path(tempfile.mkstemp(prefix="textseg-worker-", suffix=".log")[1])
        environment = self._environment()
        with open(log, "wb") as handle:
            popen = subprocess.Popen(
                [self.python, "-m", "TextSegLib", "serve", "--host", DEFAULT_HOST, "--port", "0", "--ready-line",
                 "--exit-with-stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=handle, env=environment)
        process = _Process(popen, log, environment)
        deadline = time.monotonic() + self.startup_timeout
        line = b""
        while time.monotonic() < deadline and popen.poll() is None:
            line = popen.stdout.readline()
            if line.startswith(READY_LINE.encode()):
                process.url = line.decode().split()[1]
                break
        if not process.url:
            popen.kill()
            popen.wait()
            raise WorkerError(f"The TextSeg worker did not start: {self._last_log_line(log)} (log: {log}).")
        self._process = process
        self.url = process.url

    def _environment(self) -> dict[str, str]:
        """The environment of the worker's processes: this process's, the extra variables, the token, this
        TextSegLib first on ``PYTHONPATH``, and OpenMP threads that sleep when they wait
        (:data:`~TextSegLib.core.threads.PASSIVE_WAITING`, unless set), so the worker leaves the CPU to 3D Slicer
        and to other runs between its batches."""
        environment = {**PASSIVE_WAITING, **os.environ, **self.environment, TOKEN_VARIABLE: self.token,
                       "PYTHONUNBUFFERED": "1"}
        repository = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, environment.get("PYTHONPATH")]))
        return environment

    def import_model(self, path: str | os.PathLike[str], model_id: str | None = None) -> ImportedModel:
        """Check a checkpoint file fully and copy it into the worker's models folder under ``model_id`` (default:
        the file name), with ``textseg import`` run by the worker's Python in the worker's environment, so into
        the folder the worker lists; return the model as the worker now lists it.

        Raises :class:`WorkerError` with ``textseg import``'s one-line message when it refuses the file (damaged,
        not a checkpoint, an id already taken).
        """
        died = self._died()
        if died is not None:
            raise died
        environment = self._process.environment if self.running else self._environment()
        command = [self.python, "-m", "TextSegLib", "import", os.fspath(path)]
        if model_id is not None:
            command += ["--id", model_id]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  errors="replace", env=environment, timeout=IMPORT_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise WorkerError(f"Importing {Path(path).name} did not finish within {IMPORT_TIMEOUT:.0f} s; nothing "
                              "was imported.") from None
        if done.returncode != 0:
            lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
            reason = (lines[-1].removeprefix(_ERROR_PREFIX) if lines
                      else f"textseg import ended with code {done.returncode} and no message; nothing was imported.")
            raise WorkerError(reason)
        printed = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        imported = _IMPORTED.fullmatch(printed[-1]) if printed else None
        if imported is None:
            raise WorkerError(f"textseg import said {printed[-1] if printed else 'nothing'!r}, not which model it "
                              "imported; run `textseg models` to see whether it is there.")
        for choice in self.models():
            if choice.id == imported["id"]:
                return ImportedModel(choice, Path(imported["path"]))
        raise WorkerError(f"The model {imported['id']!r} was imported to {imported['path']}, but "
                          f"{self.describe()} does not list it; check its log.")

    @staticmethod
    def _last_log_line(log: Path) -> str:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no message"

    def _died(self) -> WorkerError | None:
        """If the worker has died: forget it (the next call starts a fresh one) and say how it ended."""
        process = self._process
        if process is None or process.popen.poll() is None:
            return None
        self._process = None
        code = process.popen.returncode
        how = f"was stopped by signal {-code}" if code < 0 else f"exited with code {code}"
        hint = " (it may have run out of memory)" if code in (-9, 137) else ""
        return WorkerError(f"The TextSeg worker process {how}{hint}; nothing was changed. The next run starts a "
                           f"fresh worker (log: {process.log}).")

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = POLL_TIMEOUT) -> bytes:
        died = self._died()
        if died is not None:
            raise died
        self.start()
        try:
            return super().request(method, path, body, timeout)
        except WorkerError as error:
            process = self._process
            if process is not None and isinstance(error, WorkerUnreachableError):
                # A killed worker drops its connections a moment before the system reports it dead.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.popen.wait(2.0)
            raise (self._died() or error) from None

    def stop(self) -> None:
        """End the worker (closing its standard input; killed if it does not exit within 5 s)."""
        process, self._process = self._process, None
        if process is None:
            return
        popen = process.popen
        if popen.poll() is None:
            popen.stdin.close()
            try:
                popen.wait(5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        popen.stdout.close()
        process.log.unlink(missing_ok=True)


_SHARED: dict[tuple[str, str, str], RemoteWorker] = {}


def shared_worker(server: str | None = None, token: str | None = None, python: str | None = None) -> RemoteWorker:
    """The worker client for ``server`` (an http(s) URL, reached with ``token``), or this computer's worker when
    ``server`` is empty; the same client (and so the same running worker, with its loaded models) every call."""
    key = (server or "", token or "", python or "")
    worker = _SHARED.get(key)
    if worker is None:
        worker = _SHARED[key] = RemoteWorker(server, token) if server else LocalWorker(python)
    return worker


def stop_local_workers() -> None:
    """Stop every worker process :func:`shared_worker` started on this computer (servers are left alone)."""
    for worker in _SHARED.values():
        if isinstance(worker, LocalWorker):
            worker.stop()
