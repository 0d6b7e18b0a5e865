"""Where a fresh ``textseg segment`` spends its time, what runs that share the CPU cost each other, and issue 25's
targets side by side.

    python Benchmarks/startup.py [--model abdomen-freqmedclip-small] [--repeats 5] [--reference CHECKOUT]

On three real cases (lung2, 512 x 512 x 61 CT; patient B, the bundled 512 x 512 x 20 DICOM series; a 128^3
head-and-neck CT converted from the OpenKBP sample in ``../shared/data/openkbp-sample``), it prints:

- a fresh process, stage by stage: interpreter start, importing torch, importing the engine, reading the volume,
  loading the model with its text encoder, encoding the prompt, the first prompt's run (kernel set-up, the batch
  size's timing when no earlier run remembered it, and the network), a second prompt's run on the warm engine
  (the network alone), and writing the ``.seg.nrrd``;
- ``textseg segment`` with one prompt in a fresh process, wall time, with an empty cache (the CPU batch size is
  timed) and with the cache an earlier run filled, against the warm engine's time for a prompt (target: at most
  4 s more);
- on the head-and-neck CT (the issue's case), two ``textseg segment`` runs started together against the same two
  run one after the other, measured in each of ``--repeats`` repetitions (target: together never slower), and
  ``--concurrent`` more runs started together once;
- result identity: the mask of every command run against the warm engine's, and with ``--reference`` (a checkout
  of an earlier TextSeg, e.g. ``git worktree add ../textseg-main main``) against that version's ``textseg
  segment``; voxels that differ are counted, with how many of them lie more than 0.05 from the threshold (target:
  none).

Figures, not a test: run it on an otherwise idle machine, or say what else ran. Threads are what each process
chooses by itself under TextSeg's policy (:mod:`TextSegLib.core.threads`), as a user's runs would.
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

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MARGIN = 0.05  # how far from the threshold a voxel may lie whose mask value differs

# The stages of a fresh run, timed inside a child process (time.time() stamps, compared with the parent's); the
# first prompt's mask and probabilities are saved for the identity checks.
_STAGES = r"""
import json, sys, time
stamps = {"started": time.time()}
from TextSegLib.core.threads import configure
configure()
import torch
stamps["torch imported"] = time.time()
import numpy as np
from TextSegLib.app.cli import end_process
from TextSegLib.core.options import SegmentOptions
from TextSegLib.engine.run import Segmenter
from TextSegLib.io.segnrrd import segment_for_result, write_seg_nrrd
from TextSegLib.io.volumes import read_volume
stamps["engine imported"] = time.time()
image, prompt, second, model, output, arrays = sys.argv[1:]
volume = read_volume(image)
stamps["volume read"] = time.time()
segmenter = Segmenter([model], SegmentOptions(probability=True))
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
np.savez(arrays, mask=result.mask, probability=result.probability, threshold=result.threshold)
saved = time.time()  # the arrays for the identity checks: not a stage of a user's run
print(json.dumps({"stamps": stamps, "saved": saved, "threads": torch.get_num_threads()}))
end_process(0)  # as the textseg command ends
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


def stages(image: Path, prompt: str, second: str, model: str, output: Path, arrays: Path,
           environment: dict[str, str]) -> tuple[list[tuple[str, float]], int]:
    """Seconds spent in each stage of a fresh process (the first is the interpreter's start), and its threads."""
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", _STAGES, str(image), prompt, second, model, str(output),
                           str(arrays)], capture_output=True, text=True, cwd=REPO, env=environment)
    if done.returncode:
        raise SystemExit(done.stderr)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    ended = time.time()
    previous, rows = launched, []
    for name, stamp in report["stamps"].items():
        rows.append((name if name != "started" else "interpreter started", stamp - previous))
        previous = stamp
    rows.append(("process exit", ended - report["saved"]))
    return rows, report["threads"]


def command(image: Path, prompt: str, model: str, output: Path) -> list[str]:
    return [sys.executable, "-m", "TextSegLib", "segment", str(image), "-p", prompt, "-m", model, "-o",
            str(output), "-q", "--overwrite"]


def started_together(image: Path, prompt: str, model: str, outputs: list[Path], environment: dict[str, str],
                     checkout: Path = REPO) -> list[float]:
    """Wall seconds after which each of ``len(outputs)`` ``textseg segment`` processes, started together, ended."""
    started = time.perf_counter()
    processes = [subprocess.Popen(command(image, prompt, model, output), cwd=checkout, env=environment,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for output in outputs]
    walls = []
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode:
            raise SystemExit(stderr.decode(errors="replace"))
        walls.append(time.perf_counter() - started)
    return walls


def one_after_the_other(image: Path, prompt: str, model: str, outputs: list[Path],
                        environment: dict[str, str]) -> float:
    """Wall seconds of the same runs, each started when the one before ended."""
    return sum(started_together(image, prompt, model, [output], environment)[0] for output in outputs)


def mask_of(path: Path) -> np.ndarray:
    """The one segment of a ``.seg.nrrd`` as a boolean array (z, y, x)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0


def differences(mask: np.ndarray, reference: np.ndarray, probability: np.ndarray, threshold: float) -> str:
    """How many voxels of ``mask`` differ from ``reference``, and how many of those lie more than
    :data:`MARGIN` from the threshold (by ``probability``)."""
    if mask.shape != reference.shape:
        return f"different shapes {mask.shape} and {reference.shape}"
    differ = mask != reference
    far = int((differ & (np.abs(probability - threshold) > MARGIN)).sum())
    verdict = "identical" if not differ.any() else ("met" if not far else "MISSED")
    return f"{int(differ.sum())} voxels differ, {far} of them more than {MARGIN} from the threshold ({verdict})"


def environment_with_cache(cache: Path) -> dict[str, str]:
    return {**os.environ, "XDG_CACHE_HOME": str(cache), "PYTHONPATH": str(REPO)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="abdomen-freqmedclip-small")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions of two runs started together")
    parser.add_argument("--concurrent", default="3", help="more runs to start together once, e.g. 3,4 (none: '')")
    parser.add_argument("--reference", type=Path, help="a checkout of an earlier TextSeg to compare masks with")
    parser.add_argument("--cases", default="lung2,patient B,head and neck",
                        help="which cases, by the start of their names")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from TextSegLib.core.threads import available_cpus, thread_count

    threads, source = thread_count()
    print(f"CPU cores: {os.cpu_count()}, this process may use {available_cpus()}; each run computes with {threads} "
          f"threads ({source}); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (PASSIVE in each run)')}; "
          f"load average {os.getloadavg()[0]:.2f} at the start")
    wanted = [name.strip() for name in args.cases.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        workspace = Path(folder)
        for name, image, prompt, second in cases(workspace):
            if not any(name.startswith(prefix) for prefix in wanted):
                continue
            cache = workspace / f"cache-{len(list(workspace.glob('cache-*')))}"
            filled = environment_with_cache(cache)
            print(f"\n{name}: '{prompt}'")
            rows, used = stages(image, prompt, second, args.model, workspace / "stages.seg.nrrd",
                                workspace / "stages.npz", filled)
            for stage, seconds in rows:
                print(f"  {stage:<28}{seconds:8.2f} s")
            warm = dict(rows)["second prompt segmented"]
            saved = np.load(workspace / "stages.npz")
            reference, probability, threshold = saved["mask"].astype(bool), saved["probability"], float(
                saved["threshold"])
            empty = environment_with_cache(workspace / f"empty-{cache.name}")
            fresh = {}
            for label, environment in (("empty cache", empty), ("filled cache", filled)):
                output = workspace / f"fresh-{label.split()[0]}.seg.nrrd"
                fresh[label] = started_together(image, prompt, args.model, [output], environment)[0]
                print(f"  textseg segment, fresh process, {label}: {fresh[label]:.2f} s; mask: "
                      f"{differences(mask_of(output), reference, probability, threshold)}")
            verdict = "met" if fresh["filled cache"] <= warm + 4 else "MISSED"
            print(f"  a prompt on the warm engine: {warm:.2f} s ({used} threads); fresh process with the filled cache "
                  f"{fresh['filled cache'] - warm:+.2f} s more (target at most +4 s: {verdict})")
            if args.reference is not None:
                output = workspace / "reference.seg.nrrd"
                reference_environment = {**os.environ, "PYTHONPATH": str(args.reference.resolve())}
                wall = started_together(image, prompt, args.model, [output], reference_environment,
                                        args.reference.resolve())[0]
                print(f"  the reference checkout's textseg segment: {wall:.2f} s; this version's warm engine against "
                      f"it: {differences(reference, mask_of(output), probability, threshold)}")
            if not name.startswith("head and neck"):
                continue
            for repeat in range(args.repeats):
                outputs = [workspace / f"together-{n}.seg.nrrd" for n in range(2)]
                together = max(started_together(image, prompt, args.model, outputs, filled))
                after = one_after_the_other(image, prompt, args.model, outputs, filled)
                masks = [differences(mask_of(output), reference, probability, threshold) for output in outputs]
                print(f"  2 started together (repeat {repeat + 1}): both done after {together:.1f} s; one after the "
                      f"other {after:.1f} s ({'met' if together <= after else 'MISSED'}); masks: {masks[0]}; "
                      f"{masks[1]}")
            for count in [int(n) for n in args.concurrent.split(",") if n.strip()]:
                outputs = [workspace / f"together-{n}.seg.nrrd" for n in range(count)]
                walls = started_together(image, prompt, args.model, outputs, filled)
                print(f"  {count} started together: each finished after {', '.join(f'{w:.1f}' for w in walls)} s")
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
