"""The worker protocol: the wire format between a TextSeg worker (``textseg serve``) and its clients, and the
light types both sides share (:class:`SegmentRequest`, :class:`ModelChoice`, the worker's errors).

Protocol, version 1 (every path starts with ``/v1``; every request carries ``Authorization: Bearer <token>`` when
the worker has a token; errors are JSON ``{"error": "<one line for the user>"}`` with a 4xx/5xx status):

``GET /v1/health``
    ``{"protocol": 1, "textseg": "<version>", "busy": <jobs queued or running>, "max_request_bytes": <limit>,
    "max_queued": <jobs that may wait>, "jobs": {"queued": n, "running": n, "done": n, "failed": n,
    "cancelled": n}, "models_loaded": [ids],
    "prompts_encoded": <prompts encoded so far>, "prompts_reused": <encodings taken from the cache>}``.
``GET /v1/models``
    The worker's catalogue: ``[{"id", "title", "architecture", "description", "example_prompts", "threshold",
    "text_role"}]`` (``text_role``: what the prompt does in that network).
``POST /v1/jobs``
    Body: one *frame* (below) whose header is ``{"request": {...}, "volume": {...}}`` and whose payload is the
    voxels. ``request``: ``prompt``, ``models`` (catalogue ids), ``device`` ("auto", "cpu", "cuda", "cuda:N"),
    ``batch_size`` (null = automatic), ``threshold`` (null = the model's), ``probability`` (bool), ``modality``
    ("CT", "MR" or null), ``fp32`` (bool). ``volume``: ``shape`` ``[K, J, I]``, ``dtype`` (NumPy name, little
    endian), ``spacing``, ``origin`` (LPS, mm), ``direction`` (3 x 3, row-major), ``modality``, ``source``.
    Answer ``202 {"job": "<id>"}``; a body over the worker's limit is refused with 413 before it is read, one that
    does not arrive in time with 408, and a job beyond the worker's queue with 503 and ``Retry-After`` (seconds).
``GET /v1/jobs/<id>``
    ``{"state": "queued"|"running"|"done"|"failed"|"cancelled", "done": slices, "total": slices,
    "error": "<message>"|null, "input_error": bool}`` (``input_error``: the input was refused, not the worker
    broken). Answers with status 400, 408, 409, 413 and 422 also mean refused input.
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
carries ``"protocol": 1``), then the payload bytes. A header has at most :data:`MAX_HEADER_BYTES` bytes and
:data:`MAX_HEADER_DEPTH` levels of nesting (both checked before it is parsed); a volume at most :data:`MAX_AXIS`
voxels along each axis.

Only the standard library and NumPy are used here, so the client side runs in Slicer's Python without torch.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from TextSegLib.core.errors import TextSegError, TextSegValueError
from TextSegLib.core.messages import describe_fault, first_line, unknown_keys
from TextSegLib.core.options import SegmentOptions, check_modality
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
MAX_HEADER_BYTES = 1 << 20
"""The largest frame header (its JSON) read: a real one has a few hundred bytes, a long prompt a few thousand."""
MAX_HEADER_DEPTH = 16
"""The deepest nesting of JSON arrays and objects in a header (a real one has 3)."""
MAX_AXIS = 1 << 20
"""The most voxels along one axis of a volume sent to a worker."""
READY_LINE = "TEXTSEG-WORKER-READY"


class WorkerError(TextSegError, RuntimeError):
    """The worker could not do what was asked; the message is one line for the user, saying what to do."""


class WorkerInputError(WorkerError, ValueError):
    """The worker refused the input (an empty prompt, an unknown model, a bad threshold, a damaged volume, ...)."""


class WorkerUnreachableError(WorkerError):
    """No answer from the worker: it is not running, not listening there, or the network is down."""


INPUT_STATUSES = (400, 408, 409, 413, 422)


class ProtocolError(TextSegValueError):
    """A request or answer that does not follow the protocol (the message names what is wrong)."""


#: The options a request carries on the wire, by their names in :class:`~TextSegLib.core.options.SegmentOptions`
#: (``compile`` is the worker's own choice, not the client's).
WIRE_OPTIONS = tuple(f.name for f in fields(SegmentOptions) if f.name != "compile")


@dataclass(frozen=True)
class SegmentRequest:
    """What to segment, besides the voxels: the prompt, the models (catalogue ids, or files on the worker's
    computer) and the run's options, checked by the same rules as every front end's. On the wire the options are
    fields of the request beside ``prompt`` and ``models`` (see the module docstring)."""

    prompt: str
    models: list[str]
    options: SegmentOptions = field(default_factory=SegmentOptions)

    def validate(self) -> SegmentRequest:
        """This request with its options checked (:meth:`SegmentOptions.checked`); raise :class:`ProtocolError`
        naming the first bad field."""
        if not isinstance(self.prompt, str):
            raise ProtocolError("The prompt must be text.")
        if not isinstance(self.models, list) or not self.models or \
                not all(isinstance(m, str) and m for m in self.models):
            raise ProtocolError("No model chosen: pick one from the catalogue or import a checkpoint.")
        if not isinstance(self.options, SegmentOptions) or self.options.compile:
            raise ProtocolError("A request's options are a SegmentOptions without compile (the worker decides that).")
        try:
            return replace(self, options=self.options.checked())
        except TextSegError as error:
            raise ProtocolError(str(error)) from None

    def to_json(self) -> dict[str, Any]:
        """The request as the wire carries it (after :meth:`validate`)."""
        return {"prompt": self.prompt, "models": list(self.models),
                **{name: getattr(self.options, name) for name in WIRE_OPTIONS}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SegmentRequest:
        """Inverse of :meth:`to_json`, validated; unknown or missing fields are a :class:`ProtocolError`."""
        problem = unknown_keys(data, ("prompt", "models", *WIRE_OPTIONS), "request has unknown fields")
        if problem or "prompt" not in data or "models" not in data:
            raise ProtocolError(problem or "request needs prompt and models.")
        options = SegmentOptions(**{name: data[name] for name in WIRE_OPTIONS if name in data})
        return cls(data["prompt"], data["models"], options).validate()


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
    text += b" " * (-(8 + len(text)) % 8)  # the payload starts 8-byte aligned: a worker uses the voxels in place
    return b"".join((MAGIC, struct.pack("<I", len(text)), text, *payloads))


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


def _nesting(text: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON ``text`` (strings skipped), without parsing it."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', text)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        deepest = max(deepest, depth)
    return deepest


def _unframe(body: bytes | memoryview) -> tuple[dict[str, Any], memoryview]:
    if len(body) < 8 or body[:4] != MAGIC:
        raise ProtocolError("The body is not a TextSeg frame (it must start with TSEG).")
    (length,) = struct.unpack("<I", body[4:8])
    if 8 + length > len(body):
        raise ProtocolError("The frame's header is cut short.")
    if length > MAX_HEADER_BYTES:
        raise ProtocolError(f"The frame's header has {length} bytes; at most {MAX_HEADER_BYTES} are read.")
    text = bytes(body[8:8 + length])
    if _nesting(text) > MAX_HEADER_DEPTH:
        raise ProtocolError(f"The frame's header nests more than {MAX_HEADER_DEPTH} levels deep; it is not a "
                            "TextSeg header.")
    try:
        header = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # not UTF-8, not JSON, a number of thousands of digits, deep nesting
        raise ProtocolError(f"The frame's header is not JSON TextSeg can read: {first_line(error)}.") from error
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
        "request": request.validate().to_json(),
        "volume": {
            "shape": list(array.shape), "dtype": array.dtype.name, "spacing": [float(s) for s in volume.spacing],
            "origin": [float(o) for o in volume.origin],
            "direction": [float(d) for d in np.asarray(volume.direction, dtype=float).reshape(-1)],
            "modality": volume.modality, "source": volume.source,
        },
    }
    return _frame(header, memoryview(array).cast("B"))


def _finite(value: object) -> bool:
    """Whether a JSON value is a finite number (an integer too large for a float is not)."""
    try:
        return isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:
        return False


def _numbers(value: object, count: int, what: str) -> tuple[float, ...]:
    if not isinstance(value, list) or len(value) != count or not all(_finite(v) for v in value):
        raise ProtocolError(f"volume.{what} must be a list of {count} finite numbers.")
    return tuple(float(v) for v in value)


def decode_request(body: bytes | memoryview, max_bytes: int | None = None) -> tuple[Volume, SegmentRequest]:
    """Inverse of :func:`encode_request`; raises :class:`ProtocolError` naming what is malformed. The shape is
    checked in Python integers before anything is allocated: each axis from 1 to :data:`MAX_AXIS`, the voxels'
    bytes at most ``max_bytes`` (when given) and exactly the payload's."""
    header, payload = _unframe(body)
    wanted = header.get("request")
    meta = header.get("volume")
    if not isinstance(wanted, dict) or not isinstance(meta, dict):
        raise ProtocolError("The header needs a 'request' and a 'volume' object.")
    request = SegmentRequest.from_json(wanted)
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 3 or not all(type(s) is int and s > 0 for s in shape):
        raise ProtocolError("volume.shape must be three positive whole numbers [K, J, I].")
    if max(shape) > MAX_AXIS:
        shown = ", ".join(str(s) if len(str(s)) <= 12 else f"{str(s)[:12]}..." for s in shape)
        raise ProtocolError(f"volume.shape [{shown}] has more than {MAX_AXIS} voxels along an axis; no volume is that "
                            "large.")
    try:
        dtype = np.dtype(str(meta.get("dtype"))).newbyteorder("<")
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"volume.dtype {meta.get('dtype')!r} is not a NumPy type.") from error
    if dtype.kind not in "iuf":
        raise ProtocolError(f"volume.dtype {dtype.name} is not a scalar integer or float type.")
    expected = math.prod(shape) * dtype.itemsize  # Python integers: a huge shape cannot wrap round to the payload
    if max_bytes is not None and expected > max_bytes:
        raise ProtocolError(too_large(expected, max_bytes))
    if len(payload) != expected:
        raise ProtocolError(f"The volume has {len(payload)} bytes of voxels; shape {shape} of {dtype.name} needs "
                            f"{expected}.")
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    if not (array.flags.writeable and array.flags.aligned and array.dtype.isnative):
        array = array.astype(dtype.newbyteorder("="))  # else the voxels stay in the request's buffer, not copied
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
    """Inverse of :func:`encode_result` (the models become :class:`ModelRecord` entries); raises
    :class:`ProtocolError` for a damaged answer."""
    header, payload = _unframe(body)
    shape = header.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(s) is int and s > 0 for s in shape):
        raise ProtocolError("The result's shape must be a list of positive whole numbers.")
    voxels = math.prod(shape)
    packed = (voxels + 7) // 8
    expected = packed + (4 * voxels if header.get("probability") else 0)
    if len(payload) != expected:
        raise ProtocolError(f"The result has {len(payload)} bytes; shape {shape} needs {expected}.")
    mask = np.unpackbits(np.frombuffer(payload[:packed], dtype=np.uint8), count=voxels).reshape(shape)
    probability = None
    if header.get("probability"):
        probability = np.frombuffer(payload[packed:], dtype="<f4").reshape(shape).astype(np.float32)
    try:
        models = [ModelRecord(m["id"], m.get("sha256"), m.get("name", ""), m.get("architecture", ""))
                  for m in header["models"]]
        return SegmentationResult(mask, probability, header["prompt"], models, float(header["threshold"]),
                                  float(header["seconds"]), header.get("modality", ""),
                                  list(header.get("notes", [])), header.get("device", ""),
                                  float(header.get("max_probability", "nan")), float(header.get("voxel_ml", "nan")))
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise ProtocolError(f"The result's header is damaged ({describe_fault(error)}).") from error


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
