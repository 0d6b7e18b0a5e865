"""``textseg serve``: the segmentation worker as an HTTP service (FastAPI on uvicorn).

The protocol is documented in :mod:`TextSegLib.service.protocol`. One worker thread runs the jobs one after another
(a GPU runs one network at a time best), so several clients can submit at once and are served in order. Models and
encoded prompts stay loaded for the life of the service: re-prompting a volume costs only the forward passes.

Safety: the service listens on 127.0.0.1 unless told otherwise; listening on any other address needs a token
(``--token`` or ``$TEXTSEG_TOKEN``), and then every request must carry it. Request bodies over ``max_request_bytes``
are refused before they are read. From another computer, models are named by catalogue id only (never a file path
on the server). For TLS, put the service behind a reverse proxy that terminates HTTPS (see the README).
"""

from __future__ import annotations

import errno
import hmac
import logging
import math
import os
import socket
import sys
import threading
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from TextSegLib import __version__
from TextSegLib.core.errors import TextSegError, TextSegValueError
from TextSegLib.core.messages import describe_fault, first_line
from TextSegLib.core.results import CancelToken, SegmentationResult
from TextSegLib.core.settings import DEFAULT_HOST, DEFAULT_MAX_REQUEST_MB, SERVE_PORT, environment_token, is_loopback
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


@dataclass
class _Job:
    volume: Volume
    request: SegmentRequest
    state: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    input_error: bool = False
    result: bytes | None = None
    cancel: CancelToken = field(default_factory=CancelToken)


class JobManager:
    """Queues segmentation jobs and runs them one at a time on a worker thread.

    Args:
        models_dir: folder of imported models (None: the default catalogue folder).
        allow_paths: accept checkpoint file paths as models (only for clients on this computer).
    """

    def __init__(self, models_dir: str | None = None, allow_paths: bool = True) -> None:
        self.models_dir = models_dir
        self.allow_paths = allow_paths
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="textseg-job")

    def busy(self) -> int:
        with self._lock:
            return sum(job.state in ("queued", "running") for job in self._jobs.values())

    def submit(self, volume: Volume, request: SegmentRequest) -> str:
        job_id = uuid.uuid4().hex
        job = _Job(volume, request)
        with self._lock:
            self._jobs[job_id] = job
            self._forget_old()
        self._executor.submit(self._run, job)
        return job_id

    def _forget_old(self) -> None:
        finished = [key for key, job in self._jobs.items() if job.state in ("done", "failed", "cancelled")]
        for key in finished[:max(0, len(finished) - FINISHED_JOBS_KEPT)]:
            del self._jobs[key]

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
        try:
            result = self._segment(job)
        except TextSegError as error:  # the user's problem: its one line, input_error for refused input
            job.error, job.input_error = first_line(error), isinstance(error, ValueError)
            log.warning("Job failed: %s", job.error)
            job.state = "failed"
            return
        except Exception as error:  # a fault in TextSeg or a library: its traceback in the log
            log.exception("Job failed unexpectedly")
            job.error = f"Unexpected error in the worker: {describe_fault(error)} (see the worker's log)."
            job.state = "failed"
            return
        finally:
            job.volume = None  # the voxels are not needed any more
        if result is None:
            job.state = "cancelled"
        else:
            job.result = encode_result(result)
            job.state = "done"


def create_app(token: str | None, max_request_bytes: int, jobs: JobManager):
    """The FastAPI application serving protocol version 1 with ``jobs``."""
    app = FastAPI(title="TextSeg worker", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    prefix = f"/v{PROTOCOL_VERSION}"

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

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
                  "max_request_bytes": max_request_bytes, "models_loaded": [], "prompts_encoded": 0,
                  "prompts_reused": 0}
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

    @app.post(f"{prefix}/jobs")
    async def submit(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return error(413, too_large(int(declared), max_request_bytes))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_request_bytes:
                return error(413, too_large(size, max_request_bytes))
            chunks.append(chunk)
        try:
            volume, segment_request = decode_request(b"".join(chunks))
        except ProtocolError as problem:
            return error(400, f"Malformed request: {problem}")
        return JSONResponse({"job": jobs.submit(volume, segment_request)}, status_code=202)

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


def serve(host: str = DEFAULT_HOST, port: int = SERVE_PORT, token: str | None = None,
          max_request_mb: float = DEFAULT_MAX_REQUEST_MB, models_dir: str | None = None,
          ready_line: bool = False, exit_with_stdin: bool = False) -> None:
    """Run the worker service until interrupted.

    Raises :class:`~TextSegLib.core.errors.TextSegValueError` when ``host`` is not a loopback address and no token
    is given, for a port outside 0-65535 or a request limit that is not a positive number, and when nothing can
    listen at ``host:port``.
    """
    import uvicorn

    token = token or environment_token()
    local = is_loopback(host)
    if not local and not token:
        raise TextSegValueError(f"Listening on {host} lets other computers in: give a token with --token or "
                                "$TEXTSEG_TOKEN (clients pass the same token).")
    if not 0 <= port <= 65535:
        raise TextSegValueError(f"--port {port} is not a port number; give one from 1 to 65535 (0 picks a free one).")
    if not (math.isfinite(max_request_mb) and max_request_mb > 0):
        raise TextSegValueError(f"--max-request-mb {max_request_mb} is not a positive number of megabytes.")
    jobs = JobManager(models_dir, allow_paths=local)
    app = create_app(token, int(max_request_mb * 2**20), jobs)
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
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)
    uvicorn.Server(config).run(sockets=[listener])
