"""The segmentation worker (``textseg serve``) over real HTTP on 127.0.0.1, and its protocol.

Every server here is a real ``textseg serve`` process listening on 127.0.0.1 (at a free port): started by
:class:`LocalWorker` as 3D Slicer starts it, or by the command line. Nothing listens beyond the loopback address.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from testkit import assert_same_mask

from TextSegLib.core.options import SegmentOptions
from TextSegLib.core.results import SegmentationResult
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.io.volumes import Volume, read_volume
from TextSegLib.service.client import RemoteWorker
from TextSegLib.service.local import LocalWorker
from TextSegLib.service.protocol import (
    READY_LINE,
    ProtocolError,
    SegmentRequest,
    WorkerError,
    WorkerInputError,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
)

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a large soft-tissue mass in the posterior left lower lung"
CPU = SegmentOptions(device="cpu")


@pytest.fixture(scope="module")
def slab(data_dir) -> Volume:
    """Six real lung2 slices through the mass."""
    volume = read_volume(data_dir / "lung2_image.nrrd")
    origin = np.asarray(volume.origin) + np.asarray(volume.direction)[:, 2] * volume.spacing[2] * 26
    return Volume(np.ascontiguousarray(volume.array[26:32]), volume.spacing, tuple(origin), volume.direction, None,
                  "lung2 slab")


@pytest.fixture(scope="module")
def expected(slab, small_checkpoint) -> SegmentationResult:
    result = InferenceEngine(load_model(small_checkpoint, "cpu")).segment(slab, PROMPT, probability=True)
    assert 0 < result.voxel_count < result.mask.size
    return result


@pytest.fixture(scope="module")
def worker():
    """A worker process as Slicer starts it (loopback, random token), stopped at the end."""
    local = LocalWorker()
    local.start()
    yield local
    local.stop()


def request(small_checkpoint, **fields) -> SegmentRequest:
    return SegmentRequest(PROMPT, [str(small_checkpoint)], SegmentOptions(device="cpu", **fields))


def serve(*arguments: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``textseg serve`` on a free port; returns the process and its URL."""
    process = subprocess.Popen(
        [sys.executable, "-m", "TextSegLib", "serve", "--port", "0", "--ready-line", "--exit-with-stdin",
         *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
        env={**os.environ, **(env or {})})
    line = process.stdout.readline().decode()
    assert line.startswith(READY_LINE), process.stderr.read().decode()
    return process, line.split()[1]


def test_requests_and_results_survive_the_wire(slab, expected):
    sent = SegmentRequest("the liver", ["m"], SegmentOptions(threshold=0.3, components="largest"))
    volume, decoded = decode_request(encode_request(slab, sent))
    np.testing.assert_array_equal(volume.array, slab.array)
    assert volume.array.dtype == slab.array.dtype
    assert volume.spacing == slab.spacing and volume.origin == slab.origin
    np.testing.assert_array_equal(volume.direction, slab.direction)
    assert decoded == sent
    result = decode_result(encode_result(expected))
    np.testing.assert_array_equal(result.mask, expected.mask)
    np.testing.assert_array_equal(result.probability, expected.probability)
    assert [(m.id, m.sha256) for m in result.models] == [(m.id, m.sha256) for m in expected.models]
    assert (result.prompt, result.threshold, result.device) == (expected.prompt, expected.threshold, "cpu")
    assert (result.max_probability, result.voxel_ml) == (expected.max_probability, expected.voxel_ml)
    assert result.presence == expected.presence and expected.max_probability == float(expected.probability.max())


def frame(header: dict | bytes, payload: bytes = b"") -> bytes:
    """A frame as a client would send it, with any header (bytes: sent as they are)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return b"TSEG" + len(text).to_bytes(4, "little") + text + payload


FIELDS = {"prompt": PROMPT, "models": ["m"]}
VOXELS = {"shape": [1, 1, 2], "dtype": "uint8", "spacing": [1, 1, 1], "origin": [0, 0, 0],
          "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1]}


@pytest.mark.parametrize(("body", "message"), [
    (b"not a frame", "not a TextSeg frame"),
    (b"TSEG\xff\x00\x00\x00{}", "cut short"),
    (b"TSEG\x02\x00\x00\x00{}", "Protocol version None"),
    # Each of these raised ValueError, TypeError, OverflowError or RecursionError: a fault, answered with 500.
    (frame(b'{"protocol": 1, "x": ' + b"1" * 5000 + b"}"), "not JSON TextSeg can read"),
    (frame(b"[" * 200_000 + b"]" * 200_000), "nests more than 16 levels deep"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "dtype": "(-1,)f4"}}, b"\0\0"),
     "is not a NumPy type"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "spacing": [10**400, 1, 1]}}, b"\0\0"),
     "volume.spacing must be a list of 3 finite numbers"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [2**32, 2**32, 1]}}),
     r"volume.shape \[4294967296, 4294967296, 1\] has more than 1048576 voxels along an axis"),
    (frame({"protocol": 1, "request": {**FIELDS, "threshold": 10**400}, "volume": VOXELS}, b"\0\0"),
     "threshold must lie between 0 and 1"),
    # Each of these passed the size check (a product that overflowed, or none at all) or recursed in the parser.
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [2**62 + 1, 4, 1]}}, b"\0" * 4),
     r"volume.shape \[461168601842..., 4, 1\] has more than 1048576 voxels along an axis"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [0, 1, 2]}}), "three positive whole"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [-1, -1, 2]}}, b"\0\0"),
     "three positive whole"),
    (frame(b'{"protocol": 1, "x": ' + b'{"a": ' * 17 + b"1" + b"}" * 17 + b"}"), "nests more than 16 levels deep"),
    (frame(b'{"protocol": 1, "x": "' + b"a" * (1 << 20) + b'"}'), r"has 1048600 bytes; at most 1048576 are read"),
    (frame(b'{"protocol": 1, "x": "\xff"}'), "not JSON TextSeg can read"),
])
def test_malformed_frames_are_named(body, message):
    with pytest.raises(ProtocolError, match=message):
        decode_request(body)


def test_brackets_in_a_prompt_are_not_nesting_and_sizes_are_checked_before_allocation(slab):
    """A prompt may hold brackets (the depth check skips strings); a shape whose bytes exceed the worker's limit is
    refused from the header alone, before the payload is compared or anything allocated."""
    prompt = "the liver " + "[{" * 40 + ' \\" ]'
    body = encode_request(slab, SegmentRequest(prompt, ["m"]))
    assert decode_request(body)[1].prompt == prompt
    with pytest.raises(ProtocolError, match=r"^The volume is too large for this worker: the request has 3\.0 MB"):
        decode_request(body, max_bytes=2**20)
    huge = frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [2**20, 2**20, 2**20]}})
    with pytest.raises(ProtocolError, match=r"the request has 1099511627776\.0 MB, the limit is 1\.0 MB"):
        decode_request(huge, max_bytes=2**20)


def test_a_damaged_result_is_a_protocol_error(expected):
    body = encode_result(expected)
    length = int.from_bytes(body[4:8], "little")
    header = json.loads(body[8:8 + length])
    for damage in ({"shape": "abc"}, {"prompt": None, "threshold": "high"}):
        with pytest.raises(ProtocolError, match="The result's"):
            decode_result(frame({**header, **damage}, body[8 + length:]))
    del header["models"]
    with pytest.raises(ProtocolError, match=r"header is damaged \(KeyError: 'models'\)"):
        decode_result(frame(header, body[8 + length:]))


@pytest.mark.parametrize(("fields", "message"), [
    ({"device": "auto:3"}, r"^Unknown device 'auto:3': use auto, cpu, cuda or cuda:N"),
    ({"device": "cpu:x"}, r"^Unknown device 'cpu:x'"),
    ({"batch_size": 0}, r"^The batch size must be at least 1 \(or automatic\), not 0\.$"),
    ({"batch_size": True}, r"^The batch size must be a whole number, not bool\.$"),
    ({"threshold": 1.0}, r"^The threshold must lie between 0 and 1"),
    ({"modality": "PET"}, r"^The modality must be 'CT', 'MR' or None \(guess it\), not 'PET'\.$"),
    ({"components": "biggest"}, r"^components 'biggest' is not one of all, largest: 'all' keeps every part"),
])
def test_requests_are_checked_by_the_rules_every_front_end_uses(slab, fields, message):
    with pytest.raises(ProtocolError, match=message):
        SegmentRequest(PROMPT, ["m"], SegmentOptions(**fields)).validate()
    with pytest.raises(ProtocolError, match=message):
        decode_request(_edited_body(slab, "request", fields))


def test_unknown_request_fields_are_named(slab):
    known = r"\(known: batch_size, components, device, fp32"
    with pytest.raises(ProtocolError, match=r"^request has unknown fields: colour " + known):
        decode_request(_edited_body(slab, "request", {"colour": "red"}))


def test_a_volume_header_s_modality_is_checked_too(slab):
    with pytest.raises(ProtocolError, match=r"^volume\.modality: The modality must be 'CT', 'MR'"):
        decode_request(_edited_body(slab, "volume", {"modality": "PET"}))


def _edited_body(volume: Volume, part: str, fields: dict) -> bytes:
    """A request's body whose header's ``part`` ("request" or "volume") has ``fields`` changed, sent as is."""
    body = encode_request(volume, SegmentRequest(PROMPT, ["m"]))
    length = int.from_bytes(body[4:8], "little")
    header = json.loads(body[8:8 + length])
    header[part].update(fields)
    text = json.dumps(header).encode()
    return b"TSEG" + len(text).to_bytes(4, "little") + text + body[8 + length:]


def test_the_worker_segments_as_the_engine_does_and_reports_progress(worker, slab, expected, small_checkpoint):
    seen = []
    job = worker.submit(slab, request(small_checkpoint, probability=True, batch_size=2))
    result = job.wait(progress=lambda done, total: seen.append((done, total)))
    np.testing.assert_array_equal(result.mask, expected.mask)
    np.testing.assert_allclose(result.probability, expected.probability, atol=1e-6)
    assert seen[-1] == (6, 6) and len(set(seen)) >= 2
    assert result.device == "cpu" and [m.sha256 for m in result.models] == [m.sha256 for m in expected.models]
    assert worker.health()["protocol"] == 1


def test_re_prompting_reuses_the_loaded_model_and_encoded_prompts(worker, slab, small_checkpoint):
    worker.submit(slab, request(small_checkpoint)).wait()
    before = worker.health()
    worker.submit(slab, SegmentRequest("the left lung", [str(small_checkpoint)], CPU)).wait()
    worker.submit(slab, SegmentRequest("the left lung", [str(small_checkpoint)], CPU)).wait()
    after = worker.health()
    assert after["models_loaded"] == before["models_loaded"] == [small_checkpoint.name.removesuffix(".safetensors")]
    assert after["prompts_encoded"] == before["prompts_encoded"] + 1
    assert after["prompts_reused"] >= before["prompts_reused"] + 1


def test_cancel_stops_the_job_and_it_has_no_result(worker, data_dir, small_checkpoint):
    volume = read_volume(data_dir / "lung2_image.nrrd")
    job = worker.submit(volume, request(small_checkpoint, batch_size=1))
    deadline = time.monotonic() + 120
    while job.status().done == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    started = time.monotonic()
    job.cancel()
    assert job.result() is None and time.monotonic() - started < 2.0
    plain = RemoteWorker(worker.url, worker.token)
    while plain.json("GET", f"/jobs/{job.id}")["state"] == "running":
        time.sleep(0.05)
    state = plain.json("GET", f"/jobs/{job.id}")
    assert state["state"] == "cancelled" and state["done"] < state["total"] == 61
    with pytest.raises(WorkerInputError, match="The job is cancelled"):
        plain.request("GET", f"/jobs/{job.id}/result")


def test_a_wrong_or_missing_token_is_refused(worker, slab, small_checkpoint):
    for token in ("not-the-token", None):
        with pytest.raises(WorkerError, match="refused the token"):
            RemoteWorker(worker.url, token).submit(slab, request(small_checkpoint))
    assert worker.health()["busy"] == 0


def test_malformed_and_wrongly_sized_requests_are_refused_with_400(worker, slab, small_checkpoint):
    client = RemoteWorker(worker.url, worker.token)
    with pytest.raises(WorkerInputError, match="Malformed request: The body is not a TextSeg frame"):
        client.request("POST", "/jobs", b"hello")
    body = bytearray(encode_request(slab, request(small_checkpoint)))
    with pytest.raises(WorkerInputError, match="bytes of voxels"):
        client.request("POST", "/jobs", bytes(body[:-10]))
    header = json.dumps({"protocol": 1, "request": {"prompt": PROMPT, "models": ["x"], "threshold": 2},
                         "volume": {}}).encode()
    with pytest.raises(WorkerInputError, match="threshold must lie between 0 and 1"):
        client.request("POST", "/jobs", b"TSEG" + len(header).to_bytes(4, "little") + header)
    with pytest.raises(WorkerError, match="No job '0123' on this worker"):
        client.json("GET", "/jobs/0123")


def test_refused_input_in_a_job_comes_back_as_a_value_error(worker, slab, small_checkpoint):
    for fields, message in (({"prompt": "   "}, "The prompt is empty"), ({"models": ["no-such-model"]},
                                                                           "No model named 'no-such-model'")):
        job = worker.submit(slab, SegmentRequest(**{"prompt": PROMPT, "models": [str(small_checkpoint)],
                                                    "options": CPU, **fields}))
        with pytest.raises(WorkerInputError, match=message):
            job.wait()


def test_an_oversized_request_is_refused_before_it_is_read(slab, small_checkpoint):
    process, url = serve("--max-request-mb", "0.1", env={"TEXTSEG_TOKEN": "secret"})
    try:
        client = RemoteWorker(url, "secret")
        with pytest.raises(WorkerInputError, match=r"too large for this worker: the request has 0\.1 MB, the limit"):
            client.submit(Volume(slab.array[:1, :256, :256].copy(), slab.spacing, slab.origin, slab.direction),
                          request(small_checkpoint))
        connection = http.client.HTTPConnection(*url.removeprefix("http://").split(":"))
        connection.putrequest("POST", "/v1/jobs")
        connection.putheader("Authorization", "Bearer secret")
        connection.putheader("Content-Length", str(10**12))
        connection.endheaders()
        answer = connection.getresponse()
        assert answer.status == 413 and "the limit is 0.1 MB" in json.loads(answer.read())["error"]
    finally:
        process.stdin.close()
        process.wait(10)


def test_two_clients_at_once_both_get_their_own_result(worker, slab, expected, small_checkpoint):
    results: dict[str, SegmentationResult] = {}

    def client(name: str, prompt: str) -> None:
        results[name] = RemoteWorker(worker.url, worker.token).submit(
            slab, SegmentRequest(prompt, [str(small_checkpoint)], CPU)).wait()

    threads = [threading.Thread(target=client, args=(name, prompt))
               for name, prompt in (("first", PROMPT), ("second", "the right lung"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert_same_mask(results["first"].mask, expected.mask, expected.probability, expected.threshold)
    assert results["second"].prompt == "the right lung"
    assert not np.array_equal(results["second"].mask, results["first"].mask)


def test_listening_beyond_this_computer_needs_a_token():
    done = subprocess.run([sys.executable, "-m", "TextSegLib", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, encoding="utf-8", cwd=REPO, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != "TEXTSEG_TOKEN"})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "textseg: error: Listening on 0.0.0.0 lets other computers in: give a token with --token or $TEXTSEG_TOKEN "
        "(clients pass the same token)."]


def finished(manager, job_id: str) -> dict:
    deadline = time.monotonic() + 60
    while manager.status(manager.get(job_id))["state"] in ("queued", "running"):
        assert time.monotonic() < deadline, "the job never finished"
        time.sleep(0.05)
    return manager.status(manager.get(job_id))


@pytest.mark.parametrize(("error", "named"), [(RuntimeError(), "RuntimeError"),
                                               (KeyError("spacing"), "KeyError: 'spacing'")])
def test_a_fault_in_a_job_fails_it_with_one_line_and_logs_its_traceback(error, named, slab, small_checkpoint,
                                                                        monkeypatch):
    """A fault (not a TextSegError) fails its job, not as refused input, with one line naming it for the client
    and its traceback in the worker's log; also when it has no message (the first line of an empty message was
    once taken with ``[0]``, which raised IndexError in the job thread and left the job "running" for ever). The
    fault is a stand-in: the engine's ``segment`` raises as a bug in it would."""
    import logging

    from TextSegLib.engine.inference import InferenceEngine
    from TextSegLib.service.server import JobManager

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(InferenceEngine, "segment", fail)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("textseg").addHandler(handler)
    try:
        manager = JobManager()
        status = finished(manager, manager.submit(slab, request(small_checkpoint)))
    finally:
        logging.getLogger("textseg").removeHandler(handler)
    assert status == {"state": "failed", "done": 0, "total": 0, "input_error": False,
                      "error": f"Unexpected error in the worker: {named} (see the worker's log)."}
    (logged,) = [record for record in records if record.getMessage() == "Job failed unexpectedly"]
    assert logged.exc_info[1] is error


def test_a_server_refuses_file_paths_from_other_computers(slab, small_checkpoint):
    from TextSegLib.service.server import JobManager

    manager = JobManager(allow_paths=False)
    status = finished(manager, manager.submit(slab, request(small_checkpoint)))
    assert status["state"] == "failed" and status["input_error"]
    assert status["error"].startswith(f"No model named {str(small_checkpoint)!r} on this server")


def test_textseg_segment_on_a_server_writes_what_it_writes_in_process(tmp_path, slab, small_checkpoint):
    """Also the device: where there is no GPU, "cuda" means the CPU and the same note, in this process or there."""
    image = tmp_path / "slab.nrrd"
    sitk.WriteImage(slab.to_sitk(), str(image))
    device = "cpu" if torch.cuda.is_available() else "cuda"
    process, url = serve(env={"TEXTSEG_TOKEN": "secret"})
    try:
        outputs = {}
        for how, extra in (("local", []), ("server", ["--server", url, "--token", "secret"])):
            outputs[how] = tmp_path / f"{how}.seg.nrrd"
            done = subprocess.run([sys.executable, "-m", "TextSegLib", "segment", str(image), "-p", PROMPT,
                                   "-m", str(small_checkpoint), "--device", device, "-q", "-o", str(outputs[how]),
                                   *extra], capture_output=True, encoding="utf-8", cwd=REPO, timeout=300)
            assert done.returncode == 0, done.stderr
            notes = [line for line in done.stderr.splitlines() if line.startswith("textseg: note: ")]
            assert notes == ([] if device == "cpu" else
                             ["textseg: note: No usable GPU was found; TextSeg runs on the CPU."]), done.stderr
        refused = subprocess.run([sys.executable, "-m", "TextSegLib", "segment", str(image), "-p", PROMPT,
                                  "-m", str(small_checkpoint), "-q", "-o", str(tmp_path / "x.seg.nrrd"), "--server",
                                  url], capture_output=True, encoding="utf-8", cwd=REPO, timeout=300)
        assert refused.returncode == 1 and not (tmp_path / "x.seg.nrrd").exists()
        assert refused.stderr.strip().splitlines()[-1].startswith("textseg: error: The TextSeg server refused")
    finally:
        process.stdin.close()
        process.wait(10)
    local, remote = (slicerio.read_segmentation(str(outputs[how])) for how in ("local", "server"))
    np.testing.assert_array_equal(local["voxels"], remote["voxels"])
    assert local["segments"][0]["tags"] == remote["segments"][0]["tags"]


# ------------------------------------------------------------------------------------------------- bounds


def wait_state(manager, job_id: str, states: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 120
    while manager.get(job_id) is not None and manager.get(job_id).state not in states:
        assert time.monotonic() < deadline, "the job never got there"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def thin(slab) -> Volume:
    """Two slices of the slab: a job that runs in a fraction of a second."""
    return Volume(np.ascontiguousarray(slab.array[2:4]), slab.spacing, slab.origin, slab.direction, None, "thin")


def test_a_job_holds_its_volume_only_until_it_ran_or_was_cancelled(thin, small_checkpoint):
    from TextSegLib.service.server import JobManager

    slab = thin
    manager = JobManager()
    try:
        first = manager.submit(slab, request(small_checkpoint))
        second = manager.submit(slab, request(small_checkpoint))
        assert manager.get(second).volume is slab
        manager.cancel(manager.get(second))  # still queued: it never runs, its voxels go now
        assert manager.get(second).state == "cancelled" and manager.get(second).volume is None
        wait_state(manager, first, ("done",))
        assert manager.get(first).volume is None and manager.get(first).result
    finally:
        manager.close()


def test_finished_jobs_are_forgotten_without_new_jobs(thin, small_checkpoint, monkeypatch):
    """A result nobody fetches goes after ``result_ttl`` seconds, and the limit on finished jobs holds as jobs
    finish: both were checked only when a new job arrived, so results stayed for ever on a quiet worker."""
    from TextSegLib.service import server

    monkeypatch.setattr(server, "FINISHED_JOBS_KEPT", 1)
    manager = server.JobManager(max_queued=3, result_ttl=1.0)
    try:
        jobs = [manager.submit(thin, request(small_checkpoint)) for _ in range(3)]
        wait_state(manager, jobs[-1], ("done",))
        assert [manager.get(job) is not None for job in jobs] == [False, False, True]  # one finished job kept
        time.sleep(1.5)  # the sweep forgets it, no request needed
        assert manager.get(jobs[-1]) is None and manager.counts() == dict.fromkeys(
            ("queued", "running", "done", "failed", "cancelled"), 0)
    finally:
        manager.close()


class Log:
    """A server's stderr, read line by line as it comes."""

    def __init__(self, process: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert time.monotonic() < deadline, (text, self.lines)
            time.sleep(0.05)
        return [line for line in self.lines if text in line]


@pytest.fixture(scope="module")
def bounded():
    """One ``textseg serve`` with small bounds for this module's tests: 2 waiting jobs, results kept 3 s, 2 s to
    send a request's headers (and its body, besides 1 s per MB), requests up to 64 MB."""
    process, url = serve("--max-queued", "2", "--result-ttl", "3", "--read-timeout", "2", "--max-request-mb", "64",
                         env={"TEXTSEG_TOKEN": "secret"})
    log = Log(process)
    yield url, log
    process.stdin.close()
    process.wait(10)
    assert not any("Traceback" in line or "Exception in ASGI" in line for line in log.lines), log.lines


def post(url: str, body: bytes) -> tuple[int, dict, dict]:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("POST", "/v1/jobs", body, {"Authorization": "Bearer secret"})
    answer = connection.getresponse()
    return answer.status, json.loads(answer.read()), dict(answer.getheaders())


@pytest.mark.parametrize(("body", "message"), [
    (frame(b"[" * 200_000 + b"]" * 200_000), "nests more than 16 levels deep"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [2**32, 2**32, 1]}}),
     "has more than 1048576 voxels along an axis"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [2**62 + 1, 4, 1]}}, b"\0" * 4),
     "has more than 1048576 voxels along an axis"),
    (frame({"protocol": 1, "request": FIELDS, "volume": {**VOXELS, "shape": [1024, 1024, 1024]}}, b"\0" * 4),
     "The volume is too large for this worker"),
    (b"TSEG\xff\xff\xff\x7f" + b"x" * 100, "cut short"),
    (frame(b'{"protocol": 1, "request": {"prompt": "' + b"x" * (2 << 20) + b'"}}'), "at most 1048576 are read"),
])
def test_malformed_requests_get_a_json_400_and_no_traceback(bounded, body, message):
    url, log = bounded
    status, answer, _ = post(url, body)
    assert status == 400 and message in answer["error"], answer
    assert not any("Traceback" in line for line in log.lines), log.lines


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/nothing", 404), ("PUT", "/v1/jobs", 405),
                                                       ("GET", "/v2/health", 404)])
def test_paths_and_methods_outside_the_protocol_get_its_json_error(bounded, method, path, status):
    url, _ = bounded
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request(method, path, headers={"Authorization": "Bearer secret"})
    answer = connection.getresponse()
    assert answer.status == status
    assert json.loads(answer.read()) == {"error": f"{http.client.responses[status]}: {method} {path} is not part of "
                                                  "the TextSeg worker protocol (version 1)."}


def test_a_full_queue_is_refused_with_503_and_retry_after(bounded, data_dir, slab, small_checkpoint):
    url, _ = bounded
    client = RemoteWorker(url, "secret")
    long = client.submit(read_volume(data_dir / "lung2_image.nrrd"), request(small_checkpoint, batch_size=1))
    deadline = time.monotonic() + 60
    while long.status().state == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    waiting = [client.submit(slab, request(small_checkpoint)) for _ in range(2)]
    try:
        status, answer, headers = post(url, encode_request(slab, request(small_checkpoint)))
        assert status == 503 and int(headers["retry-after"]) >= 1
        assert answer["error"] == ("The worker is busy: 2 jobs are waiting, as many as it takes (textseg serve "
                                   "--max-queued); try again shortly.")
        with pytest.raises(WorkerError, match=r"^The worker is busy: 2 jobs are waiting"):
            client.submit(slab, request(small_checkpoint))
        assert client.health()["jobs"]["queued"] == 2
    finally:
        for job in [*waiting, long]:
            client.request("DELETE", f"/jobs/{job.id}")
    assert client.health()["busy"] == 0


def test_a_result_nobody_fetches_is_freed_after_the_ttl(bounded, thin, small_checkpoint):
    url, _ = bounded
    client = RemoteWorker(url, "secret")
    job = client.submit(thin, request(small_checkpoint))
    deadline = time.monotonic() + 120
    while not job.status().finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.health()["jobs"]["done"] == 1
    time.sleep(3 + 1)  # the TTL, and a sweep (every TTL / 4)
    with pytest.raises(WorkerError, match="No job"):
        client.json("GET", f"/jobs/{job.id}")
    assert client.health()["jobs"]["done"] == 0


def raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=20)


def test_a_client_sending_its_body_a_byte_at_a_time_gets_408(bounded):
    url, log = bounded
    connection = raw(url)
    connection.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                       b"Content-Length: 1000\r\n\r\n")
    started = time.monotonic()
    answer = b""
    with contextlib.suppress(OSError):
        while b"\r\n\r\n" not in answer and time.monotonic() - started < 15:
            connection.sendall(b"x")
            connection.settimeout(0.25)
            with contextlib.suppress(TimeoutError):
                answer += connection.recv(4096)
        connection.settimeout(5)
        while chunk := connection.recv(4096):  # the server closes after its answer; the body may come apart
            answer += chunk
    connection.close()
    assert answer.startswith(b"HTTP/1.1 408 ") and b"took longer than 2 s to arrive" in answer, answer
    assert 1.5 < time.monotonic() - started < 10
    log.wait_for("A client sent a job too slowly")


def test_a_client_sending_its_headers_a_byte_at_a_time_is_disconnected(bounded):
    url, log = bounded
    connection = raw(url)
    started = time.monotonic()
    with contextlib.suppress(OSError):
        for byte in b"POST /v1/jobs HTTP/1.1\r\nHost: " + b"x" * 100:
            connection.sendall(bytes([byte]))
            time.sleep(0.1)
    closed_after = time.monotonic() - started
    connection.close()
    assert 1.5 < closed_after < 8
    log.wait_for("its request's headers took more than 2 s")


def test_a_client_that_disconnects_mid_upload_is_one_log_line(bounded):
    url, log = bounded
    connection = raw(url)
    connection.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n"
                       b"Content-Length: 100000\r\n\r\n" + b"x" * 1000)
    time.sleep(0.2)
    connection.close()
    assert log.wait_for("disconnected") == ["textseg: WARNING: A client disconnected while sending a job; nothing was "
                                            "queued."]
    time.sleep(0.5)
    assert not any("Traceback" in line or "ClientDisconnect" in line for line in log.lines), log.lines
