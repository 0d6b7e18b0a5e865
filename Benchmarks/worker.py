"""What the worker process costs and saves: re-prompting through the worker against in-process, and the round trip.

    python Benchmarks/worker.py [--device cpu|cuda] [--model abdomen-freqmedclip-small]

For the real lung2 CT (512 x 512 x 61) and a 512 x 512 x 300 CT made from it (``benchmark.resampled``), with the
shipped demo model, it prints:

- in-process (``InferenceEngine`` in this process): the first prompt after loading the model, and a second prompt
  on the same volume;
- through a worker (``LocalWorker``, as 3D Slicer runs it): the first prompt on a cold worker (its start, the
  model's load and the upload included), and a second prompt on the same volume;
- the worker's round trip for the second prompt: the wall time seen by the client minus the engine's own time in
  the worker (sending the voxels, packing and receiving the mask, polling every 100 ms).

Figures, not a test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time

from benchmark import resampled  # Benchmarks/benchmark.py: python puts the script's folder on the path

from TextSegLib.core.options import SegmentOptions
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.evaluation.demo import DEMO_MODEL, demo_case
from TextSegLib.io.volumes import Volume, read_volume
from TextSegLib.service.local import LocalWorker
from TextSegLib.service.protocol import SegmentRequest

PROMPTS = ("a large soft-tissue mass in the posterior left lower lung", "a solid mass in the left lung")


def in_process(volume: Volume, model: str, device: str) -> tuple[float, float]:
    engine = InferenceEngine(load_model(model, device))
    times = []
    for prompt in PROMPTS:
        started = time.perf_counter()
        engine.segment(volume, prompt)
        times.append(time.perf_counter() - started)
    return times[0], times[1]


def through_worker(volume: Volume, model: str, device: str) -> tuple[float, float, float]:
    worker = LocalWorker()
    try:
        times, engine_seconds = [], 0.0
        for prompt in PROMPTS:
            started = time.perf_counter()
            result = worker.submit(volume, SegmentRequest(prompt, [model], SegmentOptions(device=device))).wait()
            times.append(time.perf_counter() - started)
            engine_seconds = result.seconds
        return times[0], times[1], times[1] - engine_seconds
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=DEMO_MODEL)
    args = parser.parse_args()
    lung2 = read_volume(demo_case("lung2")["image"])
    print("volume | in-process 1st / 2nd prompt (s) | worker 1st (cold) / 2nd prompt (s) | worker round trip (s)")
    for label, volume in (("lung2 512x512x61", lung2), ("512x512x300", resampled(lung2, 300))):
        first, second = in_process(volume, args.model, args.device)
        cold, warm, round_trip = through_worker(volume, args.model, args.device)
        print(f"{label} | {first:.2f} / {second:.2f} | {cold:.2f} / {warm:.2f} | {round_trip:.2f}", flush=True)


if __name__ == "__main__":
    main()
