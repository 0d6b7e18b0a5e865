"""Where a fresh ``textseg segment`` spends its time, and what runs that share the CPU cost each other.

    python Benchmarks/startup.py [--model abdomen-freqmedclip-small] [--repeats 1] [--concurrent 1,2,3]

On three real cases (lung2, 512 x 512 x 61 CT; patient B, the bundled 512 x 512 x 20 DICOM series; a 128^3
head-and-neck CT converted from the OpenKBP sample in ``../shared/data/openkbp-sample``), it prints:

- a fresh process, stage by stage: interpreter start, importing torch, importing the engine, reading the volume,
  loading the model with its text encoder, encoding the prompt, the first prompt's run (kernel set-up and the
  network), a second prompt's run on the warm engine (the network alone), and writing the ``.seg.nrrd``;
- ``textseg segment`` with one prompt in a fresh process, wall time, against the warm engine's time for a prompt;
- N ``textseg segment`` runs started together (each on the same case) against running them one after the other.

Figures, not a test: run it on an otherwise idle machine. Threads are what each process chooses by itself (no
``OMP_NUM_THREADS`` set here unless the caller set it), as a user's runs would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

# The stages of a fresh run, timed inside a child process (time.time() stamps, compared with the parent's).
_STAGES = r"""
import json, sys, time
stamps = {"started": time.time()}
import torch
stamps["torch imported"] = time.time()
from TextSegLib.core.options import SegmentOptions
from TextSegLib.engine.run import Segmenter
from TextSegLib.io.segnrrd import segment_for_result, write_seg_nrrd
from TextSegLib.io.volumes import read_volume
stamps["engine imported"] = time.time()
image, prompt, second, model, output = sys.argv[1:]
volume = read_volume(image)
stamps["volume read"] = time.time()
segmenter = Segmenter([model], SegmentOptions())
loaded = segmenter.loaded[0]
stamps["model and encoder loaded"] = time.time()
loaded.text_encoder.encode_cached(prompt)
stamps["prompt encoded"] = time.time()
result = segmenter.segment(volume, prompt)
stamps["first prompt segmented"] = time.time()
segmenter.segment(volume, second)
stamps["second prompt segmented"] = time.time()
write_seg_nrrd(output, [segment_for_result(result)], volume)
stamps["written"] = time.time()
print(json.dumps(stamps))
"""


def cases(workspace: Path) -> list[tuple[str, Path, str, str]]:
    """``(name, image, prompt, second prompt)`` for the three cases; the head-and-neck CT is converted here."""
    sys.path.insert(0, str(REPO))
    from TextSegLib.evaluation.demo import demo_case
    from Training.datasets.openkbp import convert_patient

    patient = sorted((SHARED / "openkbp-sample" / "train-pats").iterdir())[0]
    converted = convert_patient(patient, workspace / patient.name, "train")
    if converted is None:
        raise SystemExit(f"{patient} has no ct.csv")
    return [
        ("lung2 (512 x 512 x 61)", Path(demo_case("lung2")["image"]), "the spinal cord", "the liver"),
        ("patient B (512 x 512 x 20)", Path(demo_case("abdomen")["image"]), "the liver", "the spleen"),
        (f"head and neck {patient.name} (128^3)", workspace / patient.name / "ct.nrrd", "the spinal cord",
         "the liver"),
    ]


def stages(image: Path, prompt: str, second: str, model: str, output: Path) -> list[tuple[str, float]]:
    """Seconds spent in each stage of a fresh process; the first is the interpreter's start."""
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", _STAGES, str(image), prompt, second, model, str(output)],
                          capture_output=True, text=True, cwd=REPO, check=True)
    stamps = json.loads(done.stdout.strip().splitlines()[-1])
    ended = time.time()
    names, previous, rows = list(stamps), launched, []
    for name in names:
        rows.append((name if name != "started" else "interpreter started", stamps[name] - previous))
        previous = stamps[name]
    rows.append(("process exit", ended - previous))
    return rows


def command(image: Path, prompt: str, model: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "TextSegLib", "segment", str(image), "-p", prompt, "-m", model, "-o",
            str(output), "-q", "--overwrite"]


def concurrent(image: Path, prompt: str, model: str, workspace: Path, count: int) -> list[float]:
    """Wall seconds of ``count`` ``textseg segment`` processes started together."""
    started = time.perf_counter()
    processes = [subprocess.Popen(command(image, prompt, model, workspace / f"run{n}.seg.nrrd"), cwd=REPO,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for n in range(count)]
    walls = []
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode:
            raise SystemExit(stderr.decode(errors="replace"))
        walls.append(time.perf_counter() - started)
    return walls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="abdomen-freqmedclip-small")
    parser.add_argument("--repeats", type=int, default=1, help="concurrent runs of each count, repeated")
    parser.add_argument("--concurrent", default="1,2,3", help="how many runs to start together, e.g. 1,2,3")
    args = parser.parse_args()
    counts = [int(n) for n in args.concurrent.split(",")]
    print(f"CPU cores: {os.cpu_count()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    with tempfile.TemporaryDirectory() as folder:
        workspace = Path(folder)
        for name, image, prompt, second in cases(workspace):
            print(f"\n{name}: '{prompt}'")
            rows = stages(image, prompt, second, args.model, workspace / "stages.seg.nrrd")
            for stage, seconds in rows:
                print(f"  {stage:<28}{seconds:8.2f} s")
            warm = dict(rows)["second prompt segmented"]
            started = time.perf_counter()
            subprocess.run(command(image, prompt, args.model, workspace / "cli.seg.nrrd"), cwd=REPO, check=True,
                           stdout=subprocess.DEVNULL)
            fresh = time.perf_counter() - started
            print(f"  textseg segment, fresh process: {fresh:.2f} s; a prompt on the warm engine: {warm:.2f} s; "
                  f"difference {fresh - warm:.2f} s")
            alone = concurrent(image, prompt, args.model, workspace, 1)[0]
            for count in counts:
                for repeat in range(args.repeats):
                    walls = concurrent(image, prompt, args.model, workspace, count)
                    print(f"  {count} started together (repeat {repeat + 1}): each finished after "
                          f"{', '.join(f'{w:.1f}' for w in walls)} s; one after the other would take about "
                          f"{count * alone:.1f} s")


if __name__ == "__main__":
    main()
