"""Segmentation in a worker process: the protocol, the client, and the local worker that 3D Slicer starts.

The networks never run in the process that asks for a segmentation. 3D Slicer's main thread holds Python's GIL
while it idles in the Qt event loop, so a Python thread there barely runs; a separate process runs at full speed,
keeps its models and encoded prompts loaded between runs, and can crash or run out of memory without taking Slicer
down. The worker is ``textseg serve`` (:mod:`TextSegLib.server`): started on this computer by
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
    voxels. ``request``: ``prompt``, ``models`` (catalogue ids), ``device`` ("auto", "cpu", "cuda"),
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
import json
import os
import secrets
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .common import TextSegError, TextSegValueError
from .results import ModelRecord, SegmentationResult
from .volumes import Volume

__all__ = [
    "PROTOCOL_VERSION",
    "Job",
    "LocalWorker",
    "ModelChoice",
    "ProtocolError",
    "RemoteWorker",
    "SegmentRequest",
    "WorkerError",
    "WorkerInputError",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
    "shared_worker",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_REQUEST_MB = 2048
MAGIC = b"TSEG"
READY_LINE = "TEXTSEG-WORKER-READY"
DEVICES = ("auto", "cpu", "cuda")
POLL_TIMEOUT = 5.0
# Uploading a 512 x 512 x 1000 CT over a slow link: generous, but a hung server still ends.
TRANSFER_TIMEOUT = 600.0


class WorkerError(TextSegError, RuntimeError):
    """The worker could not do what was asked; the message is one line for the user, saying what to do."""


class WorkerInputError(WorkerError, ValueError):
    """The worker refused the input (an empty prompt, an unknown model, a bad threshold, a damaged volume, ...)."""


class WorkerUnreachableError(WorkerError):
    """No answer from the worker: it is not running, not listening there, or the network is down."""


INPUT_STATUSES = (400, 409, 413, 422)


class ProtocolError(TextSegValueError):
    """A request or answer that does not follow the protocol (the message names what is wrong)."""


@dataclass
class SegmentRequest:
    """What to segment, besides the voxels (see the module docstring for each field)."""

    prompt: str
    models: list[str]
    device: str = "auto"
    batch_size: int | None = None
    threshold: float | None = None
    probability: bool = False
    modality: str | None = None
    fp32: bool = False

    def validate(self) -> SegmentRequest:
        """Check the fields' types and ranges; raise :class:`ProtocolError` naming the first bad one."""
        if not isinstance(self.prompt, str):
            raise ProtocolError("The prompt must be text.")
        if not isinstance(self.models, list) or not self.models or \
                not all(isinstance(m, str) and m for m in self.models):
            raise ProtocolError("No model chosen: pick one from the catalogue or import a checkpoint.")
        if not isinstance(self.device, str) or self.device.split(":")[0] not in DEVICES:
            raise ProtocolError(f"Unknown device {self.device!r}: use auto, cpu or cuda.")
        if self.batch_size is not None and (type(self.batch_size) is not int or self.batch_size < 1):
            raise ProtocolError("The batch size must be a whole number of at least 1 (or automatic).")
        if self.threshold is not None and (not isinstance(self.threshold, int | float)
                                           or not 0.0 < float(self.threshold) < 1.0):
            raise ProtocolError("The threshold must lie between 0 and 1.")
        if self.modality not in (None, "CT", "MR"):
            raise ProtocolError("The modality must be CT or MR.")
        if not isinstance(self.probability, bool) or not isinstance(self.fp32, bool):
            raise ProtocolError("probability and fp32 must be true or false.")
        return self


def too_large(size: int, limit: int) -> str:
    """The message for a request of ``size`` bytes over a worker's ``limit``."""
    return (f"The volume is too large for this worker: the request has {size / 2**20:.1f} MB, the limit is "
            f"{limit / 2**20:.1f} MB (textseg serve --max-request-mb).")


# ------------------------------------------------------------------------------------------------------ frames


def _frame(header: dict[str, Any], *payloads: bytes | memoryview) -> bytes:
    text = json.dumps({"protocol": PROTOCOL_VERSION, **header}, ensure_ascii=False).encode("utf-8")
    return b"".join((MAGIC, struct.pack("<I", len(text)), text, *payloads))


def _unframe(body: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(body) < 8 or body[:4] != MAGIC:
        raise ProtocolError("The body is not a TextSeg frame (it must start with TSEG).")
    (length,) = struct.unpack("<I", body[4:8])
    if 8 + length > len(body):
        raise ProtocolError("The frame's header is cut short.")
    try:
        header = json.loads(bytes(body[8:8 + length]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"The frame's header is not JSON: {error}.") from error
    if not isinstance(header, dict):
        raise ProtocolError("The frame's header must be a JSON object.")
    if header.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"Protocol version {header.get('protocol')!r} is not spoken here (this side speaks "
                            f"{PROTOCOL_VERSION}); use the same TextSeg version on both sides.")
    return header, memoryview(body)[8 + length:]


def encode_request(volume: Volume, request: SegmentRequest) -> bytes:
    """The ``POST /v1/jobs`` body for segmenting ``volume`` as ``request`` says."""
    array = np.ascontiguousarray(volume.array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    header = {
        "request": asdict(request.validate()),
        "volume": {
            "shape": list(array.shape), "dtype": array.dtype.name, "spacing": [float(s) for s in volume.spacing],
            "origin": [float(o) for o in volume.origin],
            "direction": [float(d) for d in np.asarray(volume.direction, dtype=float).reshape(-1)],
            "modality": volume.modality, "source": volume.source,
        },
    }
    return _frame(header, memoryview(array).cast("B"))


def _numbers(value: object, count: int, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != count or \
            not all(isinstance(v, int | float) and np.isfinite(v) for v in value):
        raise ProtocolError(f"volume.{what} must be a list of {count} finite numbers.")
    return tuple(float(v) for v in value)


def decode_request(body: bytes) -> tuple[Volume, SegmentRequest]:
    """Inverse of :func:`encode_request`; raises :class:`ProtocolError` naming what is malformed."""
    header, payload = _unframe(body)
    fields = header.get("request")
    meta = header.get("volume")
    if not isinstance(fields, dict) or not isinstance(meta, dict):
        raise ProtocolError("The header needs a 'request' and a 'volume' object.")
    known = {f for f in SegmentRequest.__dataclass_fields__}
    unknown = sorted(set(fields) - known)
    if unknown or "prompt" not in fields or "models" not in fields:
        raise ProtocolError(f"request: unknown fields {unknown}" if unknown else "request needs prompt and models.")
    request = SegmentRequest(**fields).validate()
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(s) is int and s > 0 for s in shape):
        raise ProtocolError("volume.shape must be three positive whole numbers [K, J, I].")
    try:
        dtype = np.dtype(str(meta.get("dtype"))).newbyteorder("<")
    except TypeError as error:
        raise ProtocolError(f"volume.dtype {meta.get('dtype')!r} is not a NumPy type.") from error
    if dtype.kind not in "iuf":
        raise ProtocolError(f"volume.dtype {dtype.name} is not a scalar integer or float type.")
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(payload) != expected:
        raise ProtocolError(f"The volume has {len(payload)} bytes of voxels; shape {shape} of {dtype.name} needs "
                            f"{expected}.")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    direction = np.array(_numbers(meta.get("direction"), 9, "direction")).reshape(3, 3)
    modality = meta.get("modality")
    if modality not in (None, "CT", "MR"):
        raise ProtocolError("volume.modality must be CT, MR or null.")
    volume = Volume(array, _numbers(meta.get("spacing"), 3, "spacing"), _numbers(meta.get("origin"), 3, "origin"),
                    direction, modality, str(meta.get("source") or ""))
    return volume, request


def encode_result(result: SegmentationResult) -> bytes:
    """The ``GET /v1/jobs/<id>/result`` body for ``result``."""
    header = {
        "prompt": result.prompt, "threshold": result.threshold, "seconds": result.seconds,
        "modality": result.modality, "notes": list(result.notes), "device": result.device,
        "models": [{"id": m.id, "sha256": m.sha256, "name": getattr(m, "name", ""),
                    "architecture": getattr(m, "architecture", "")} for m in result.models],
        "shape": list(result.mask.shape), "probability": result.probability is not None,
        "max_probability": result.max_probability, "voxel_ml": result.voxel_ml,
    }
    payloads = [np.packbits(result.mask.astype(bool), axis=None).tobytes()]
    if result.probability is not None:
        payloads.append(np.ascontiguousarray(result.probability, dtype="<f4").tobytes())
    return _frame(header, *payloads)


def decode_result(body: bytes) -> SegmentationResult:
    """Inverse of :func:`encode_result` (the models become :class:`ModelRecord` entries)."""
    header, payload = _unframe(body)
    shape = tuple(header["shape"])
    voxels = int(np.prod(shape))
    packed = (voxels + 7) // 8
    expected = packed + (4 * voxels if header["probability"] else 0)
    if len(payload) != expected:
        raise ProtocolError(f"The result has {len(payload)} bytes; shape {list(shape)} needs {expected}.")
    mask = np.unpackbits(np.frombuffer(payload[:packed], dtype=np.uint8), count=voxels).reshape(shape)
    probability = None
    if header["probability"]:
        probability = np.frombuffer(payload[packed:], dtype="<f4").reshape(shape).astype(np.float32)
    models = [ModelRecord(m["id"], m.get("sha256"), m.get("name", ""), m.get("architecture", ""))
              for m in header["models"]]
    return SegmentationResult(mask, probability, header["prompt"], models, float(header["threshold"]),
                              float(header["seconds"]), header.get("modality", ""), list(header.get("notes", [])),
                              header.get("device", ""), float(header.get("max_probability", "nan")),
                              float(header.get("voxel_ml", "nan")))


# ------------------------------------------------------------------------------------------------------ client


@dataclass
class JobStatus:
    """A job's state as the worker reports it."""

    state: str
    done: int = 0
    total: int = 0
    error: str | None = None
    input_error: bool = False

    @property
    def finished(self) -> bool:
        return self.state in ("done", "failed", "cancelled")


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
        return [ModelChoice.from_json(item) for item in self.json("GET", "/models")]

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
        environment = {**os.environ, **self.environment, "TEXTSEG_TOKEN": self.token,
                       "PYTHONUNBUFFERED": "1"}
        repository = str(Path(__file__).resolve().parents[1])
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [repository, environment.get("PYTHONPATH")]))
        with open(log, "wb") as handle:
            popen = subprocess.Popen(
                [self.python, "-m", "TextSegLib.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--ready-line",
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


@dataclass(frozen=True)
class ModelChoice:
    """A model as a picker shows it, from a local catalogue entry or a worker's ``/v1/models`` answer."""

    id: str
    title: str
    architecture: str
    description: str
    example_prompts: tuple[str, ...]
    threshold: float
    text_role: str = ""

    @classmethod
    def from_entry(cls, entry: Any) -> ModelChoice:
        """From a :class:`TextSegLib.checkpoints.CatalogueEntry`."""
        return cls(entry.id, entry.title, entry.architecture_title, entry.info.description,
                   tuple(entry.info.example_prompts), float(entry.info.threshold), entry.text_role)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelChoice:
        return cls(str(data["id"]), str(data["title"]), str(data["architecture"]), str(data["description"]),
                   tuple(str(p) for p in data["example_prompts"]), float(data["threshold"]),
                   str(data.get("text_role", "")))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "example_prompts": list(self.example_prompts)}
