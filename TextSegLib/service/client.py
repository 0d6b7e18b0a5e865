"""The client of a running worker (``textseg serve``): :class:`RemoteWorker` and the :class:`Job` it returns.

Standard library and NumPy only, so 3D Slicer's process talks to a worker without importing torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from TextSegLib.core.results import SegmentationResult
from TextSegLib.io.volumes import Volume
from TextSegLib.service.protocol import (
    INPUT_STATUSES,
    PROTOCOL_VERSION,
    JobStatus,
    ModelChoice,
    ProtocolError,
    SegmentRequest,
    WorkerError,
    WorkerInputError,
    WorkerUnreachableError,
    decode_result,
    encode_request,
    too_large,
)

__all__ = [
    "ImportedModel",
    "Job",
    "RemoteWorker",
]

POLL_TIMEOUT = 5.0


# Uploading a 512 x 512 x 1000 CT over a slow link: generous, but a hung server still ends.
TRANSFER_TIMEOUT = 600.0
# A worker's first model list loads its model code (torch): several seconds on a busy computer.
CATALOGUE_TIMEOUT = 120.0


class ImportedModel(NamedTuple):
    """A model imported into a worker's models folder: as the worker lists it, and the file it was copied to."""

    choice: ModelChoice
    path: Path


class RemoteWorker:
    """A client of a running worker (``textseg serve``) at ``url``, authenticated by ``token``.

    Every method raises :class:`WorkerError` with one line for the user when the worker cannot be reached or
    refuses the request.
    """

    def __init__(self, url: str, token: str | None = None) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise WorkerError(f"The server address {url!r} must start with http:// or https://, for example "
                              "http://gpu-server:8765.")
        try:
            parts = urllib.parse.urlsplit(url)
            if not parts.hostname or parts.port == 0:  # reading .port raises ValueError for a port out of range
                raise ValueError("it names no computer" if not parts.hostname else "port 0 is no server's port")
        except ValueError as error:
            raise WorkerError(f"The server address {url!r} is not a valid address ({error}); give one such as "
                              "http://gpu-server:8765.") from None
        self.url = url
        self.token = token or None

    def describe(self) -> str:
        """Where segmentation runs, for messages."""
        return f"the TextSeg server at {self.url}"

    def _unreachable(self, error: Exception) -> WorkerUnreachableError:
        reason = getattr(error, "reason", error)
        return WorkerUnreachableError(f"Cannot reach {self.describe()} ({reason}); check that it runs and the "
                                      "address.")

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = POLL_TIMEOUT) -> bytes:
        """Send one request; return the answer's body (raises :class:`WorkerError` for any error answer)."""
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        message = urllib.request.Request(f"{self.url}/v{PROTOCOL_VERSION}{path}", data=body, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(message, timeout=timeout) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            try:
                text = json.loads(error.read().decode("utf-8"))["error"]
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                text = f"{self.describe()} answered {error.code} {error.reason}"
            raise (WorkerInputError if error.code in INPUT_STATUSES else WorkerError)(text) from None
        except (urllib.error.URLError, OSError) as error:
            raise self._unreachable(error) from None

    def json(self, method: str, path: str, body: bytes | None = None, timeout: float = POLL_TIMEOUT) -> Any:
        return json.loads(self.request(method, path, body, timeout).decode("utf-8"))

    def health(self) -> dict[str, Any]:
        """The worker's version and load; raises when it speaks another protocol version."""
        answer = self.json("GET", "/health")
        if answer.get("protocol") != PROTOCOL_VERSION:
            raise WorkerError(f"{self.describe()} speaks protocol {answer.get('protocol')}, this TextSeg "
                              f"{PROTOCOL_VERSION}: use the same TextSeg version on both sides.")
        return answer

    def models(self) -> list[ModelChoice]:
        """The worker's model catalogue."""
        return [ModelChoice.from_json(item) for item in self.json("GET", "/models", timeout=CATALOGUE_TIMEOUT)]

    def import_model(self, path: str | os.PathLike[str], model_id: str | None = None) -> ImportedModel:
        """Add a checkpoint file to the worker's models. The protocol cannot carry a model to a server, so this
        raises :class:`WorkerError` saying to import it on the server (:class:`~TextSegLib.service.local.
        LocalWorker` imports into its own folder)."""
        command = f"textseg import {Path(path).name}" + (f" --id {model_id}" if model_id else "")
        raise WorkerError(f"Models cannot be imported into {self.describe()} from here: copy the file to that "
                          f"computer and run `{command}` there, then pick the model.")

    def submit(self, volume: Volume, request: SegmentRequest) -> Job:
        """Send ``volume`` and ``request``; the returned :class:`Job` reports progress and gives the result."""
        try:
            body = encode_request(volume, request)
        except ProtocolError as error:
            raise WorkerInputError(str(error)) from None
        # Asked first, so that a wrong token or a volume over the limit is said before the upload, not as a
        # connection the worker closes in the middle of it.
        limit = self.health().get("max_request_bytes")
        if limit is not None and len(body) > limit:
            raise WorkerInputError(too_large(len(body), limit))
        answer = json.loads(self.request("POST", "/jobs", body, timeout=TRANSFER_TIMEOUT).decode("utf-8"))
        return Job(self, answer["job"], volume.array.shape)


class Job:
    """One segmentation on a worker. Poll :meth:`status` (quick), then read :meth:`result`.

    :meth:`cancel` returns at once: the worker stops before its next batch and the job's result is never read.
    """

    def __init__(self, worker: RemoteWorker, job_id: str, shape: tuple[int, ...]) -> None:
        self.worker = worker
        self.id = job_id
        self.shape = shape
        self.cancelled = False
        self._last = JobStatus("queued")

    def status(self) -> JobStatus:
        """The job's state now (a cancelled job reads "cancelled" without asking the worker)."""
        if self.cancelled:
            return JobStatus("cancelled", self._last.done, self._last.total)
        answer = self.worker.json("GET", f"/jobs/{self.id}")
        self._last = JobStatus(answer["state"], int(answer.get("done", 0)), int(answer.get("total", 0)),
                               answer.get("error"), bool(answer.get("input_error")))
        return self._last

    def cancel(self) -> None:
        """Stop the job; the worker is told, and a worker that no longer answers is not waited for."""
        if self.cancelled:
            return
        self.cancelled = True
        with contextlib.suppress(WorkerError):  # a worker that died or hangs has nothing left to stop
            self.worker.request("POST", f"/jobs/{self.id}/cancel", b"", timeout=1.0)

    def result(self) -> SegmentationResult | None:
        """The finished job's result; None when it was cancelled; raises :class:`WorkerError` when it failed."""
        status = self.status()
        if status.state == "cancelled":
            return None
        if status.state == "failed":
            raise (WorkerInputError if status.input_error else WorkerError)(
                status.error or "The segmentation failed in the worker.")
        if status.state != "done":
            raise WorkerError(f"The job is still {status.state}; wait for it to finish.")
        try:
            return decode_result(self.worker.request("GET", f"/jobs/{self.id}/result", timeout=TRANSFER_TIMEOUT))
        except ProtocolError as error:
            raise WorkerError(f"{self.worker.describe()} sent a damaged result ({error}).") from None

    def wait(self, progress: Callable[[int, int], None] | None = None, interval: float = 0.1,
             cancel: Callable[[], bool] | None = None) -> SegmentationResult | None:
        """Poll until the job ends and return :meth:`result`; ``cancel()`` returning True cancels it."""
        while True:
            if cancel is not None and cancel():
                self.cancel()
            status = self.status()
            if progress is not None and status.total:
                progress(status.done, status.total)
            if status.finished:
                return self.result()
            time.sleep(interval)
