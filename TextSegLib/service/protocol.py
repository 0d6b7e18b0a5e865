"""TODO docstring."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from TextSegLib.core.errors import TextSegError, TextSegValueError
from TextSegLib.core.messages import unknown_keys
from TextSegLib.core.options import check_batch_size, check_device, check_modality, check_threshold
from TextSegLib.core.results import ModelRecord, SegmentationResult
from TextSegLib.io.volumes import Volume

__all__ = [
    "PROTOCOL_VERSION",
    "ModelChoice",
    "ProtocolError",
    "SegmentRequest",
    "WorkerError",
    "WorkerInputError",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
]

PROTOCOL_VERSION = 1


MAGIC = b"TSEG"


READY_LINE = "TEXTSEG-WORKER-READY"


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
        """Check the fields' types and ranges (:mod:`TextSegLib.core.options`' checks, as every front end);
        raise :class:`ProtocolError` naming the first bad one."""
        if not isinstance(self.prompt, str):
            raise ProtocolError("The prompt must be text.")
        if not isinstance(self.models, list) or not self.models or \
                not all(isinstance(m, str) and m for m in self.models):
            raise ProtocolError("No model chosen: pick one from the catalogue or import a checkpoint.")
        _as_protocol_error(check_device, self.device)
        _as_protocol_error(check_batch_size, self.batch_size)
        if self.threshold is not None:
            _as_protocol_error(check_threshold, self.threshold)
        _as_protocol_error(check_modality, self.modality)
        if not isinstance(self.probability, bool) or not isinstance(self.fp32, bool):
            raise ProtocolError("probability and fp32 must be true or false.")
        return self


def _as_protocol_error(check: Callable[[object], object], value: object, where: str = "") -> None:
    """``check(value)``, its :class:`~TextSegLib.core.errors.TextSegError` a :class:`ProtocolError` of the same
    line (after ``where: `` when given)."""
    try:
        check(value)
    except TextSegError as error:
        raise ProtocolError(f"{where}: {error}" if where else str(error)) from None


def too_large(size: int, limit: int) -> str:
    """The message for a request of ``size`` bytes over a worker's ``limit``."""
    return (f"The volume is too large for this worker: the request has {size / 2**20:.1f} MB, the limit is "
            f"{limit / 2**20:.1f} MB (textseg serve --max-request-mb).")


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
    problem = unknown_keys(fields, SegmentRequest.__dataclass_fields__, "request has unknown fields")
    if problem or "prompt" not in fields or "models" not in fields:
        raise ProtocolError(problem or "request needs prompt and models.")
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
    _as_protocol_error(check_modality, modality, "volume.modality")
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
        """From a :class:`TextSegLib.engine.catalogue.CatalogueEntry`."""
        return cls(entry.id, entry.title, entry.architecture_title, entry.info.description,
                   tuple(entry.info.example_prompts), float(entry.info.threshold), entry.text_role)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelChoice:
        return cls(str(data["id"]), str(data["title"]), str(data["architecture"]), str(data["description"]),
                   tuple(str(p) for p in data["example_prompts"]), float(data["threshold"]),
                   str(data.get("text_role", "")))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "example_prompts": list(self.example_prompts)}
