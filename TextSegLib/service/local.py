"""Segmentation in a worker process: the protocol, the client, and the local worker that 3D Slicer starts.

The networks never run in the process that asks for a segmentation. 3D Slicer's main thread holds Python's GIL
while it idles in the Qt event loop, so a Python thread there barely runs; a separate process runs at full speed,
keeps its models and encoded prompts loaded between runs, and can crash or run out of memory without taking Slicer
down. The worker is ``textseg serve`` (:mod:`TextSegLib.service.server`): started on this computer by
:class:`LocalWorker` (loopback address, a random token, stopped when its parent exits), or run by hand on a GPU
server and reached with :class:`RemoteWorker`. Both speak the same versioned HTTP protocol.

Protocol, version 1 (every path starts with ``/v1``; every request carries ``Authorization: Bearer <token>`` when
the worker has a token; errors are JSON ``{"error": "<one line for the user>"}`` with a 4xx/5xx status):

``GET /v1/health``
    ``{"protocol": 1, "textseg": "<version>", "busy": <jobs queued or running>, "max_request_bytes": <limit>,
    "models_loaded": [ids],
    "prompts_encoded": <prompts encoded so far>, "prompts_reused": <encodings taken from the cache>}``.
``GET /v1/models``
    The worker's catalogue: ``[{"id", "title", "architecture", "description", "example_prompts", "threshold",
    "text_role"}]`` (``text_role``: what the prompt does in that network).
``POST /v1/jobs``
    Body: one *frame* (below) whose header is ``{"request": {...}, "volume": {...}}`` and whose payload is the
    voxels. ``request``: ``prompt``, ``models`` (catalogue ids), ``device`` ("auto", "cpu", "cuda" or "cuda:N"),
    ``batch_size`` (null = automatic), ``threshold`` (null = the model's), ``probability`` (bool), ``modality``
    ("CT", "MR" or null), ``fp32`` (bool). ``volume``: ``shape`` ``[K, J, I]``, ``dtype`` (NumPy name, little
    endian), ``spacing``, ``origin`` (LPS, mm), ``direction`` (3 x 3, row-major), ``modality``, ``source``.
    Answer ``202 {"job": "<id>"}``; a body over the worker's limit is refused with 413 before it is read.
``GET /v1/jobs/<id>``
    ``{"state": "queued"|"running"|"done"|"failed"|"cancelled", "done": slices, "total": slices,
    "error": "<message>"|null, "input_error": bool}`` (``input_error``: the input was refused, not the worker
    broken). Answers with status 400, 409, 413 and 422 also mean refused input.
``POST /v1/jobs/<id>/cancel``
    Stops the job before its next batch of slices.
``GET /v1/jobs/<id>/result``
    A frame whose header is the result's metadata (``prompt``, ``threshold``, ``seconds``, ``modality``, ``notes``,
    ``device``, ``models`` ``[{"id", "sha256", "name", "architecture"}]``, ``shape``, ``probability`` (bool),
    ``max_probability`` and ``voxel_ml``, the evidence for "found" / "not found") and
    whose payload is the mask as packed bits (``numpy.packbits`` of the ``(K, J, I)`` mask) followed, when asked
    for, by the float32 probabilities. The job is forgotten once its result has been read.
``DELETE /v1/jobs/<id>``
    Forget a job (cancelling it first if it still runs).

A frame is ``b"TSEG"``, the header's length as a little-endian uint32, the header as UTF-8 JSON (which also
carries ``"protocol": 1``), then the payload bytes.

Only the standard library and NumPy are used here, so the client side runs in Slicer's Python without torch.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from TextSegLib.core.settings import DEFAULT_HOST, TOKEN_VARIABLE
from TextSegLib.service.client import POLL_TIMEOUT, RemoteWorker
from TextSegLib.service.protocol import READY_LINE, WorkerError, WorkerUnreachableError

__all__ = [
    "LocalWorker",
    "shared_worker",
]


# ------------------------------------------------------------------------------------------------------ frames


# ------------------------------------------------------------------------------------------------------ client


@dataclass
class _Process:
    popen: subprocess.Popen
    log: Path
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

    def describe(self) -> str:
        return "the TextSeg worker process"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.popen.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.popen.pid if self.running else None

    def start(self) -> None:
        """Start the worker (if it is not running) and wait until it listens."""
        if self.running:
            return
        self._process = None
        log = Path(tempfile.mkstemp(prefix="textseg-worker-", suffix=".log")[1])
        environment = {**os.environ, **self.environment, TOKEN_VARIABLE: self.token,
                       "PYTHONUNBUFFERED": "1"}
        repository = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, environment.get("PYTHONPATH")]))
        with open(log, "wb") as handle:
            popen = subprocess.Popen(
                [self.python, "-m", "TextSegLib", "serve", "--host", DEFAULT_HOST, "--port", "0", "--ready-line",
                 "--exit-with-stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=handle, env=environment)
        process = _Process(popen, log)
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


