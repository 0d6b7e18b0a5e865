"""``textseg serve``: the segmentation worker as an HTTP service (FastAPI on uvicorn).

The protocol is documented in :mod:`TextSegLib.service.protocol`. One worker thread runs the jobs one after another
(a GPU runs one network at a time best), so several clients can submit at once and are served in order. Models and
encoded prompts stay loaded for the life of the service: re-prompting a volume costs only the forward passes.

Safety: the service listens on 127.0.0.1 unless told otherwise; listening on any other address needs a token
(``--token`` or ``$TEXTSEG_TOKEN``), and then every request must carry it. Request bodies over ``max_request_bytes``
are refused before they are read. From another computer, models are named by catalogue id only (never a file path
on the server). For TLS, put the service behind a reverse proxy that terminates HTTPS (see the README).

Bounds: at most ``max_queued`` jobs wait (more are refused with 503 and ``Retry-After``; their body is read to its
end but not kept, so that the client reads the answer rather than failing to send);
a job holds its volume only until it has run; a finished job's result is freed when it is fetched, after
``result_ttl`` seconds, or when more than :data:`FINISHED_JOBS_KEPT` finished jobs pile up (a sweep checks every
few seconds, and whenever a job finishes). A request's headers must arrive within ``read_timeout`` seconds (else
the connection is closed) and its body within ``read_timeout`` seconds plus one per megabyte (else 408); a client
that disconnects while sending is logged in one line.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from TextSegLib import __version__
from TextSegLib.core.errors import TextSegError, TextSegValueError
from TextSegLib.core.messages import describe_fault, first_line
from TextSegLib.core.options import check_port, check_positive_number
from TextSegLib.core.results import CancelToken, SegmentationResult
from TextSegLib.core.settings import (
    DEFAULT_HOST,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_REQUEST_MB,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RESULT_TTL,
    SERVE_PORT,
    environment_token,
    is_loopback,
)
from TextSegLib.io.volumes import Volume
from TextSegLib.service.protocol import (
    PROTOCOL_VERSION,
    READY_LINE,
    ModelChoice,
    ProtocolError,
    SegmentRequest,
    decode_request,
    encode_result,
    too_large,
)

__all__ = [
    "JobManager",
    "create_app",
    "serve",
]

log = logging.getLogger("textseg")

FINISHED_JOBS_KEPT = 32
#: Seconds between two sweeps of finished jobs (at most; a short ``result_ttl`` sweeps more often).
SWEEP_SECONDS = 5.0
_FINISHED = ("done", "failed", "cancelled")


class QueueFullError(TextSegError, RuntimeError):
    """The worker already holds as many waiting jobs as it may (``--max-queued``)."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    volume: Volume | None
    request: SegmentRequest
    state: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    input_error: bool = False
    result: bytes | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    finished_at: float | None = None


class JobManager:
    """Queues segmentation jobs and runs them one at a time on a worker thread.

    Args:
        models_dir: folder of imported models (None: the default catalogue folder).
        allow_paths: accept checkpoint file paths as models (only for clients on this computer).
        max_queued: jobs that may wait (not counting the one running); :meth:`submit` refuses more.
        result_ttl: seconds a finished job is kept for its client; then it is forgotten with its result.
    """

    def __init__(self, models_dir: str | None = None, allow_paths: bool = True, max_queued: int = DEFAULT_MAX_QUEUED,
                 result_ttl: float = DEFAULT_RESULT_TTL) -> None:
        self.models_dir = models_dir
        self.allow_paths = allow_paths
        self.max_queued = max_queued
        self.result_ttl = result_ttl
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textseg-job")
        self._seconds: list[float] = []  # how long the last jobs ran, for Retry-After
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_while_running, name="textseg-sweep", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        """Stop the sweep (the service ends)."""
        self._stop.set()

    def busy(self) -> int:
        with self._lock:
            return sum(job.state in ("queued", "running") for job in self._jobs.values())

    def counts(self) -> dict[str, int]:
        """Jobs by state (``queued``, ``running``, ``done``, ...), for the health answer."""
        with self._lock:
            states = [job.state for job in self._jobs.values()]
        return {state: states.count(state) for state in ("queued", "running", *_FINISHED)}

    def _queued(self) -> int:
        return sum(job.state == "queued" for job in self._jobs.values())

    def retry_after(self) -> int:
        """Seconds after which a refused client may try again: the queue's expected time to drain one job."""
        recent = self._seconds[-8:]
        return max(1, math.ceil(sum(recent) / len(recent))) if recent else 5

    def check_room(self) -> None:
        """Raise :class:`QueueFullError` when no more jobs may wait (checked before a request's body is read)."""
        with self._lock:
            queued = self._queued()
        if queued >= self.max_queued:
            raise self._full(queued)

    def _full(self, queued: int) -> QueueFullError:
        return QueueFullError(f"The worker is busy: {queued} jobs are waiting, as many as it takes (textseg serve "
                              "--max-queued); try again shortly.", self.retry_after())

    def submit(self, volume: Volume, request: SegmentRequest) -> str:
        """Queue a job; raise :class:`QueueFullError` when ``max_queued`` jobs are waiting already."""
        job_id = uuid.uuid4().hex
        job = _Job(volume, request)
        with self._lock:
            queued = self._queued()
            if queued >= self.max_queued:
                raise self._full(queued)
            self._jobs[job_id] = job
            self._forget_old()
        self._executor.submit(self._run, job)
        return job_id

    def _forget_old(self) -> None:
        """Forget finished jobs older than ``result_ttl`` and all but the newest :data:`FINISHED_JOBS_KEPT` (under
        the lock)."""
        now = time.monotonic()
        for key in [key for key, job in self._jobs.items()
                    if job.finished_at is not None and now - job.finished_at > self.result_ttl]:
            del self._jobs[key]
        finished = [key for key, job in self._jobs.items() if job.state in _FINISHED]
        for key in finished[:max(0, len(finished) - FINISHED_JOBS_KEPT)]:
            del self._jobs[key]

    def _sweep_while_running(self) -> None:
        while not self._stop.wait(min(SWEEP_SECONDS, max(self.result_ttl / 4, 0.05))):
            with self._lock:
                self._forget_old()

    def get(self, job_id: str) -> _Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def status(self, job: _Job) -> dict[str, Any]:
        return {"state": job.state, "done": job.done, "total": job.total, "error": job.error,
                "input_error": job.input_error}

    def cancel(self, job: _Job) -> None:
        job.cancel.cancel()
        with self._lock:
            if job.state == "queued":
                job.state = "cancelled"
                job.volume = None  # it will not run: its voxels go now
                job.finished_at = time.monotonic()

    def take_result(self, job_id: str) -> bytes | None:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.result is None:
                return None
            del self._jobs[job_id]
            return job.result

    def forget(self, job_id: str) -> None:
        job = self.get(job_id)
        if job is not None:
            self.cancel(job)
            with self._lock:
                self._jobs.pop(job_id, None)

    def _progress(self, job: _Job):
        def report(done: int, total: int) -> None:
            job.done, job.total = done, total
        return report

    def _segment(self, job: _Job) -> SegmentationResult | None:
        from TextSegLib.engine.catalogue import Catalogue
        from TextSegLib.engine.run import Segmenter

        request = job.request
        segmenter = Segmenter(request.models, request.options, Catalogue(self.models_dir), self.allow_paths)
        return segmenter.segment(job.volume, request.prompt, progress=self._progress(job), cancel=job.cancel)

    def _run(self, job: _Job) -> None:
        with self._lock:
            if job.state == "cancelled":
                return
            job.state = "running"
        started = time.monotonic()
        try:
            state = self._outcome(job)
        finally:
            job.volume = None  # the voxels are not needed any more
        with self._lock:
            job.state, job.finished_at = state, time.monotonic()
            self._seconds = [*self._seconds[-7:], job.finished_at - started]
            self._forget_old()

    def _outcome(self, job: _Job) -> str:
        """Run ``job``; its final state (its result or error set)."""
        try:
            result = self._segment(job)
        except TextSegError as error:  # the user's problem: its one line, input_error for refused input
            job.error, job.input_error = first_line(error), isinstance(error, ValueError)
            log.warning("Job failed: %s", job.error)
            return "failed"
        except Exception as error:  # a fault in TextSeg or a library: its traceback in the log
            log.exception("Job failed unexpectedly")
            job.error = f"Unexpected error in the worker: {describe_fault(error)} (see the worker's log)."
            return "failed"
        if result is None:
            return "cancelled"
        job.result = encode_result(result)
        return "done"


def _unread(status: int, message: str) -> JSONResponse:
    """An error answered before the body was read to its end: the connection closes after it."""
    return JSONResponse({"error": message}, status_code=status, headers={"Connection": "close"})


async def _read_body(request: Request, max_request_bytes: int, read_timeout: float,
                     keep: bool = True) -> memoryview | JSONResponse:
    """The request's body, or the JSON error to answer: 413 past the size limit, 408 when it takes more than
    ``read_timeout`` seconds plus one per megabyte it declares (a client sending a byte a second). ``keep=False``
    reads it to its end without keeping it (a refused request: its client then reads the answer, rather than
    failing to send). A body of declared length is read into one buffer of that length (allocated untouched, so
    memory grows only as the bytes arrive), which the decoded volume's voxels then share: a request costs its size
    once, not three times (chunks, joined bytes, a copy of the voxels)."""
    declared = request.headers.get("content-length")
    size_hint = int(declared) if declared is not None and declared.isdigit() else 0
    if size_hint > max_request_bytes:
        return _unread(413, too_large(size_hint, max_request_bytes))
    allowed = read_timeout + size_hint / 2**20
    deadline = time.monotonic() + allowed
    buffer, chunks, size = np.empty(size_hint if keep else 0, np.uint8), [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), max(deadline - time.monotonic(), 0.001))
        except StopAsyncIteration:
            return memoryview(buffer[:size] if size_hint else np.frombuffer(bytearray().join(chunks), np.uint8))
        except TimeoutError:
            log.warning("A client sent a job too slowly (%d bytes in %.0f s); its request was refused.", size, allowed)
            return _unread(408, f"The request's body took longer than {allowed:.0f} s to arrive; send it over a faster "
                                "connection.")
        if size + len(chunk) > max_request_bytes:
            return _unread(413, too_large(size + len(chunk), max_request_bytes))
        if keep and size_hint:  # h11 ends a body at its declared length
            buffer[size:size + len(chunk)] = np.frombuffer(chunk, np.uint8)
        elif keep:  # no length declared (chunked)
            chunks.append(chunk)
        size += len(chunk)


def create_app(token: str | None, max_request_bytes: int, jobs: JobManager,
               read_timeout: float = DEFAULT_READ_TIMEOUT):
    """The FastAPI application serving protocol version 1 with ``jobs``; a request's body must arrive within
    ``read_timeout`` seconds plus one per megabyte."""
    app = FastAPI(title="TextSeg worker", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    prefix = f"/v{PROTOCOL_VERSION}"

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def not_in_protocol(request: Request, problem: StarletteHTTPException) -> JSONResponse:
        """An unknown path or method: the protocol's JSON error, not the framework's ``{"detail": ...}``."""
        return error(problem.status_code, f"{problem.detail}: {request.method} {request.url.path[:100]} is not part "
                                          f"of the TextSeg worker protocol (version {PROTOCOL_VERSION}).")

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if token is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error(401, "The TextSeg server refused the token: give the server's token (--token or "
                                  "$TEXTSEG_TOKEN).")
        return await call_next(request)

    @app.get(f"{prefix}/health")
    def health() -> dict[str, Any]:
        answer = {"protocol": PROTOCOL_VERSION, "textseg": __version__, "busy": jobs.busy(),
                  "max_request_bytes": max_request_bytes, "max_queued": jobs.max_queued, "jobs": jobs.counts(),
                  "models_loaded": [], "prompts_encoded": 0, "prompts_reused": 0}
        if "TextSegLib.engine.loading" in sys.modules:  # nothing is loaded before the first job
            from TextSegLib.engine.loading import loaded_model_ids
            from TextSegLib.text.features import PROMPT_CACHE

            answer.update(models_loaded=loaded_model_ids(), prompts_encoded=PROMPT_CACHE.misses,
                          prompts_reused=PROMPT_CACHE.hits)
        return answer

    @app.get(f"{prefix}/models")
    def models() -> list[dict[str, Any]]:
        from TextSegLib.engine.catalogue import Catalogue

        return [ModelChoice.from_entry(entry).to_json() for entry in Catalogue(jobs.models_dir).entries()]

    def busy(full: QueueFullError) -> JSONResponse:
        return JSONResponse({"error": str(full)}, status_code=503, headers={"Retry-After": str(full.retry_after)})

    @app.post(f"{prefix}/jobs")
    async def submit(request: Request):
        try:
            try:
                jobs.check_room()  # before the body is read: a full queue keeps none of it
            except QueueFullError as full:
                drained = await _read_body(request, max_request_bytes, read_timeout, keep=False)
                return drained if isinstance(drained, JSONResponse) else busy(full)
            body = await _read_body(request, max_request_bytes, read_timeout)
        except ClientDisconnect:
            log.warning("A client disconnected while sending a job; nothing was queued.")
            return Response(status_code=400)  # nobody reads it
        if isinstance(body, JSONResponse):
            return body
        try:
            volume, segment_request = decode_request(body, max_request_bytes)
        except ProtocolError as problem:
            return error(400, f"Malformed request: {problem}")
        del body  # the voxels are in the volume now
        try:
            return JSONResponse({"job": jobs.submit(volume, segment_request)}, status_code=202)
        except QueueFullError as full:
            return busy(full)

    def found(job_id: str):
        job = jobs.get(job_id)
        return job if job is not None else error(404, f"No job {job_id!r} on this worker (finished jobs are "
                                                     "forgotten once their result is read).")

    @app.get(prefix + "/jobs/{job_id}")
    def status(job_id: str):
        job = found(job_id)
        return job if isinstance(job, JSONResponse) else jobs.status(job)

    @app.post(prefix + "/jobs/{job_id}/cancel")
    def cancel(job_id: str):
        job = found(job_id)
        if isinstance(job, JSONResponse):
            return job
        jobs.cancel(job)
        return jobs.status(job)

    @app.get(prefix + "/jobs/{job_id}/result")
    def result(job_id: str):
        job = found(job_id)
        if isinstance(job, JSONResponse):
            return job
        if job.state != "done":
            return error(409, f"The job is {job.state}; its result is not available.")
        body = jobs.take_result(job_id)
        return Response(body, media_type="application/octet-stream")

    @app.delete(prefix + "/jobs/{job_id}")
    def forget(job_id: str):
        jobs.forget(job_id)
        return {"forgotten": job_id}

    return app


def _exit_when_stdin_closes() -> None:
    """For a worker started by another process: end when that process ends (its end of the pipe closes)."""
    def watch() -> None:
        while sys.stdin.buffer.read(1 << 16):
            pass
        os._exit(0)
    threading.Thread(target=watch, name="textseg-parent-watch", daemon=True).start()


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection, which times out a request's headers: uvicorn waits for them for ever (its
    keep-alive timeout only runs between requests), so a client sending a byte a second held a connection."""

    header_timeout = DEFAULT_READ_TIMEOUT

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _headers_too_slow(self) -> None:
        if self.cycle is None or self.cycle.response_complete:  # still no complete request line and headers
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning("Closed a connection from %s: its request's headers took more than %g s.", client,
                        self.header_timeout)
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.response_complete:
            self._header_timer.cancel()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._header_timer.cancel()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._header_timer.cancel()
        super().connection_lost(exc)


def serve(host: str = DEFAULT_HOST, port: int = SERVE_PORT, token: str | None = None,
          max_request_mb: float = DEFAULT_MAX_REQUEST_MB, models_dir: str | None = None,
          ready_line: bool = False, exit_with_stdin: bool = False, max_queued: int = DEFAULT_MAX_QUEUED,
          result_ttl: float = DEFAULT_RESULT_TTL, read_timeout: float = DEFAULT_READ_TIMEOUT) -> None:
    """Run the worker service until interrupted.

    Raises :class:`~TextSegLib.core.errors.TextSegValueError` when ``host`` is not a loopback address and no token
    is given, for a port outside 0-65535, for a limit (``max_request_mb``, ``max_queued``, ``result_ttl``,
    ``read_timeout``) that is not a finite positive number, and when nothing can listen at ``host:port``.
    """
    import uvicorn

    token = token or environment_token()
    local = is_loopback(host)
    if not local and not token:
        raise TextSegValueError(f"Listening on {host} lets other computers in: give a token with --token or "
                                "$TEXTSEG_TOKEN (clients pass the same token).")
    for flag, check, value in (
            ("--port", check_port, port),
            ("--max-request-mb", lambda v: check_positive_number(v, "megabytes"), max_request_mb),
            ("--max-queued", lambda v: check_positive_number(v, "jobs", whole=True), max_queued),
            ("--result-ttl", lambda v: check_positive_number(v, "seconds"), result_ttl),
            ("--read-timeout", lambda v: check_positive_number(v, "seconds"), read_timeout)):
        try:
            check(value)
        except TextSegError as problem:
            raise TextSegValueError(f"{flag} {problem}") from None
    jobs = JobManager(models_dir, allow_paths=local, max_queued=max_queued, result_ttl=result_ttl)
    app = create_app(token, int(min(max_request_mb, 2**40) * 2**20), jobs, read_timeout)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as problem:
        other = "--port" if problem.errno in (errno.EADDRINUSE, errno.EACCES) else "--host"
        raise TextSegValueError(f"Cannot listen on {host}:{port} ({problem.strerror or problem}); choose another "
                                f"{other}.") from None
    listener.listen(64)
    bound = listener.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}"
    if ready_line:
        print(f"{READY_LINE} {url}", flush=True)
    else:
        print(f"TextSeg worker listening on {url} (protocol {PROTOCOL_VERSION}); Ctrl-C stops it.", flush=True)
    if exit_with_stdin:
        _exit_when_stdin_closes()
    _Protocol.header_timeout = read_timeout
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2, http=_Protocol)
    uvicorn.Server(config).run(sockets=[listener])
