"""A real ``textseg serve`` under load: memory while jobs queue and over many jobs, results against in-process.

    python Benchmarks/load.py [--clients 3] [--jobs 8] [--burst 20] [--long 100] [--slices 8] [--max-queued 16]

Starts ``textseg serve`` (CPU, the shipped demo model, on the bundled abdomen CT: slabs of ``--slices`` slices,
512 x 512, int16) and samples the server process's resident memory (``VmRSS``) every 50 ms. It prints:

- burst: ``--burst`` jobs submitted at once by as many clients (a slab each): the peak memory above the warm server
  (model loaded, one job run) beside one job's peak alone plus what the jobs' volumes take (the one running and the
  ``--max-queued`` that may wait), and how many submissions the server refused with 503 (their clients wait 1 s and
  submit again);
- clients x jobs: ``--clients`` clients each running ``--jobs`` jobs one after another (prompts in turn);
- long: ``--long`` jobs one after another, the memory after every tenth (flat: nothing accumulates);
- unfetched: jobs whose results nobody fetches, with ``--result-ttl`` of 2 s: the finished jobs the server still
  holds 4 s later (0: freed without a request);
- for every job: its mask and probabilities against the same prompt segmented in this process
  (``Segmenter``, the same code and options: fp32, 4 slices per batch), and the jobs lost (no result).

Figures, not a test: run it on an otherwise idle machine (``OMP_NUM_THREADS=1 nice`` on a shared one).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from TextSegLib.core.options import SegmentOptions
from TextSegLib.core.results import SegmentationResult
from TextSegLib.engine.run import Segmenter
from TextSegLib.evaluation.demo import DEMO_MODEL, demo_case
from TextSegLib.io.volumes import Volume, read_volume
from TextSegLib.service.client import RemoteWorker
from TextSegLib.service.protocol import READY_LINE, SegmentRequest, WorkerError, decode_result

PROMPTS = ("the liver", "the spleen", "the left kidney")
#: The same options on both sides, fp32 and a fixed batch size: bf16 and the batch the engine times for itself move
#: probabilities by a few 1e-3 from run to run, which says nothing about the worker.
OPTIONS = SegmentOptions(device="cpu", probability=True, fp32=True, batch_size=4)
CPU = SegmentOptions(device="cpu", fp32=True, batch_size=4)
MB = 2**20
POLL = 120.0


class Memory:
    """The server's resident memory, sampled every 50 ms on a thread."""

    def __init__(self, pid: int) -> None:
        self.path = Path(f"/proc/{pid}/status")
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def now(self) -> int:
        for line in self.path.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.samples.append((time.monotonic(), self.now()))
            except (OSError, RuntimeError):
                return

    def peak_since(self, start: float) -> int:
        return max(rss for at, rss in self.samples if at >= start)

    def stop(self) -> None:
        self._stop.set()


def start_server(max_queued: int, result_ttl: float) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "TextSegLib", "serve", "--port", "0", "--ready-line", "--exit-with-stdin",
         "--max-queued", str(max_queued), "--result-ttl", str(result_ttl)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "TEXTSEG_TOKEN": "load"})
    line = process.stdout.readline().decode()
    if not line.startswith(READY_LINE):
        raise SystemExit(f"the server did not start: {line!r}")
    return process, line.split()[1]


class Checker:
    """Results segmented in this process, per (slab, prompt), and the comparison of every job's result."""

    def __init__(self, slabs: list[Volume], model: str) -> None:
        segmenter = Segmenter([model], OPTIONS)
        self.expected = {(n, prompt): segmenter.segment(slab, prompt)
                         for n, slab in enumerate(slabs) for prompt in PROMPTS}
        self.lost = self.different = self.checked = 0
        self.largest_difference = 0.0
        self.lock = threading.Lock()

    def check(self, slab: int, prompt: str, result: SegmentationResult | None) -> None:
        expected = self.expected[slab, prompt]
        same = result is not None and np.array_equal(result.mask, expected.mask) and \
            np.allclose(result.probability, expected.probability, atol=1e-6)
        with self.lock:
            if result is not None:
                self.largest_difference = max(self.largest_difference,
                                              float(np.abs(result.probability - expected.probability).max()))
            self.checked += 1
            self.lost += result is None
            self.different += result is not None and not same


def run_job(url: str, slab: Volume, prompt: str, model: str) -> tuple[SegmentationResult | None, int]:
    """Submit (again after 1 s while the queue is full) and wait; the result (None for a failed job) and the 503s
    met. Polls with a long timeout: on a shared machine the server can take more than the client's usual 5 s to
    answer while a job loads its model."""
    client = RemoteWorker(url, "load")
    refused = 0
    request = SegmentRequest(prompt, [model], OPTIONS)
    while True:
        try:
            job = client.submit(slab, request)
            break
        except WorkerError as error:
            if "busy" not in str(error):
                raise
            refused += 1
            time.sleep(1.0)
    while client.json("GET", f"/jobs/{job.id}", timeout=POLL)["state"] in ("queued", "running"):
        time.sleep(0.1)
    if client.json("GET", f"/jobs/{job.id}", timeout=POLL)["state"] != "done":
        return None, refused
    return decode_result(client.request("GET", f"/jobs/{job.id}/result", timeout=POLL)), refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=8, help="jobs per client")
    parser.add_argument("--burst", type=int, default=20, help="jobs submitted at once")
    parser.add_argument("--long", type=int, default=100, help="jobs one after another")
    parser.add_argument("--slices", type=int, default=8, help="slices per slab")
    parser.add_argument("--max-queued", type=int, default=16)
    parser.add_argument("--model", default=DEMO_MODEL)
    args = parser.parse_args()

    ct = read_volume(demo_case("abdomen")["image"])
    middle = ct.array.shape[0] // 2
    slabs = [Volume(np.ascontiguousarray(ct.array[start:start + args.slices]), ct.spacing, ct.origin, ct.direction,
                    "CT", f"abdomen {start}") for start in (middle - args.slices, middle)]
    volume_mb = slabs[0].array.nbytes / MB
    print(f"slabs: {len(slabs)} of {slabs[0].array.shape} {slabs[0].array.dtype} ({volume_mb:.1f} MB each); "
          f"prompts: {', '.join(PROMPTS)}; model {args.model}, CPU", flush=True)
    checker = Checker(slabs, args.model)

    process, url = start_server(args.max_queued, result_ttl=2.0)
    memory = Memory(process.pid)
    try:
        first, _ = run_job(url, slabs[0], PROMPTS[0], args.model)  # loads the model
        checker.check(0, PROMPTS[0], first)
        time.sleep(0.5)
        warm = memory.now()
        started = time.monotonic()
        alone, _ = run_job(url, slabs[1], PROMPTS[1], args.model)
        checker.check(1, PROMPTS[1], alone)
        single = memory.peak_since(started) - warm
        print(f"server: {memory.samples[0][1] / MB:.0f} MB at start, {warm / MB:.0f} MB warm (model loaded, one job "
              f"run); one job alone peaks {single / MB:.0f} MB above warm", flush=True)

        started, refused = time.monotonic(), []

        def burst_job(n: int) -> None:
            result, met = run_job(url, slabs[n % 2], PROMPTS[n % 3], args.model)
            checker.check(n % 2, PROMPTS[n % 3], result)
            refused.append(met)

        threads = [threading.Thread(target=burst_job, args=(n,)) for n in range(args.burst)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = memory.peak_since(started)
        held = (1 + min(args.max_queued, args.burst - 1)) * volume_mb
        print(f"burst: {args.burst} jobs at once in {time.monotonic() - started:.1f} s: peak {peak / MB:.0f} MB, "
              f"{(peak - warm) / MB:.0f} MB above warm, against one job alone ({single / MB:.0f} MB) plus "
              f"{held:.0f} MB of volumes (the running job's and {args.max_queued} waiting); {sum(refused)} "
              f"submissions refused with 503 ({sum(bool(r) for r in refused)} clients waited)", flush=True)

        started = time.monotonic()

        def client_jobs(c: int) -> None:
            for j in range(args.jobs):
                prompt = PROMPTS[(c + j) % 3]
                result, _ = run_job(url, slabs[j % 2], prompt, args.model)
                checker.check(j % 2, prompt, result)

        threads = [threading.Thread(target=client_jobs, args=(c,)) for c in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(f"clients x jobs: {args.clients} x {args.jobs} in {time.monotonic() - started:.1f} s, peak "
              f"{memory.peak_since(started) / MB:.0f} MB", flush=True)

        line = []
        for n in range(args.long):
            result, _ = run_job(url, slabs[n % 2], PROMPTS[n % 3], args.model)
            checker.check(n % 2, PROMPTS[n % 3], result)
            if (n + 1) % 10 == 0:
                line.append(f"{memory.now() / MB:.0f}")
        print(f"long: {args.long} jobs one after another, memory after every tenth (MB): {' '.join(line)}",
              flush=True)

        client = RemoteWorker(url, "load")
        for _ in range(5):
            client.submit(slabs[0], SegmentRequest(PROMPTS[1], [args.model], CPU))
        while client.json("GET", "/health", timeout=POLL)["busy"]:
            time.sleep(0.1)
        held = client.json("GET", "/health", timeout=POLL)["jobs"]["done"]
        time.sleep(4)
        later = client.json("GET", "/health", timeout=POLL)["jobs"]["done"]
        print(f"unfetched: 5 results nobody fetches: {held} held when the last finished, {later} held 4 s later "
              f"(--result-ttl 2); memory {memory.now() / MB:.0f} MB", flush=True)
    finally:
        memory.stop()
        process.stdin.close()
        process.wait(30)
    print(f"results: {checker.checked} jobs compared with in-process: {checker.different} different (mask not "
          f"identical or a probability off by more than 1e-6; largest probability difference "
          f"{checker.largest_difference:.1e}), {checker.lost} lost", flush=True)


if __name__ == "__main__":
    main()
