"""Bad input and faults, through the real ``textseg`` command and the library, on slabs of the real volumes.

Every refused case asserts: the exit status, exactly one line on stderr that names the problem, no traceback,
no output or temporary file left anywhere under the test's folders, and every input file byte-identical (SHA-256
before and after). Most command lines run in this process through ``TextSegLib.app.cli.main`` (the same code as the
console script, fast); write failures, interrupts (SIGINT and SIGTERM while reading, segmenting and writing), the
offline text encoder and a representative set of refusals run the console script in a real subprocess.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from TextSegLib.app.cli import main
from TextSegLib.core.errors import TextSegError
from TextSegLib.engine.catalogue import Catalogue
from TextSegLib.engine.checkpoints import CheckpointError, load_checkpoint, metadata_digest, read_checkpoint_info
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.io.segnrrd import TAG_PROMPT, SegmentSpec, decode_tag, encode_tag, read_seg_nrrd, write_seg_nrrd
from TextSegLib.io.volumes import Volume, read_volume

PROMPT = "a large soft-tissue mass in the posterior left lower lung"
TEXTSEG = Path(sys.executable).parent / "textseg"


_HASHES: dict[tuple, str] = {}


def sha256(path: Path, fresh: bool = False) -> str:
    """SHA-256 of a file's bytes; kept while its size, inode, modification and change time stay the same (the
    change time moves on every write and cannot be set back), so the large checkpoints are hashed once."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
    if fresh or key not in _HASHES:
        _HASHES[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _HASHES[key]


def every_file(folder: Path) -> set[Path]:
    """Every file and folder under ``folder``, hidden ones included."""
    return set(folder.rglob("*")) | set(folder.rglob(".*"))


def edit_header(source: Path, target: Path, sign: bool = True, **changes) -> None:
    """Copy a checkpoint with fields of its TextSeg header changed, its tensor bytes untouched (as an editor would
    change the file); ``sign`` records the digest of the changed settings, as saving them would."""
    data = source.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    metadata = json.loads(header["__metadata__"]["textseg"])
    metadata.update(changes)
    if sign:
        metadata["digest"] = metadata_digest(metadata)
    header["__metadata__"]["textseg"] = json.dumps(metadata)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


@pytest.fixture(scope="module")
def world(tmp_path_factory, data_dir, small_checkpoint):
    """Inputs made once from the real data: slabs, broken images, broken checkpoints, a label and a manifest."""
    root = tmp_path_factory.mktemp("bad-input")
    inputs = root / "inputs"
    inputs.mkdir()
    lung2 = sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))
    slab = lung2[:, :, 26:32]  # six slices through the lesion
    sitk.WriteImage(slab, str(inputs / "slab.nrrd"), True)
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "brain1_image.nrrd"))[:, :, 8:12], str(inputs / "brain.nrrd"), True)
    nan = sitk.GetImageFromArray(np.full((6, 512, 512), np.nan, np.float32))
    nan.CopyInformation(slab)
    sitk.WriteImage(nan, str(inputs / "nan.nrrd"), True)
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "lung2_label.nrrd"))[:, :, 26:32], str(inputs / "slab_label.nrrd"))
    (inputs / "garbage.nrrd").write_bytes(b"NRRD0004\nthis is not an image\n")
    (inputs / "empty.nrrd").write_bytes(b"")
    sitk.WriteImage(sitk.JoinSeries([slab[:8, :8, :4]] * 3), str(inputs / "4d.nrrd"))
    scalar = sitk.Cast(slab[:8, :8, :4], sitk.sitkUInt8)
    sitk.WriteImage(sitk.Compose(scalar, scalar, scalar), str(inputs / "rgb.nrrd"))
    (inputs / "no-dicom").mkdir()
    (inputs / "no-dicom" / "notes.txt").write_text("no images here")
    (inputs / "sub").mkdir()
    sitk.WriteImage(slab, str(inputs / "sub" / "slab.nrrd"), True)

    models = inputs / "models"
    models.mkdir()
    good = models / "good.safetensors"
    good.write_bytes(small_checkpoint.read_bytes())
    (models / "truncated.safetensors").write_bytes(good.read_bytes()[:5000])
    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(good))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(models / "tampered-weights.safetensors"), metadata=metadata)
    edit_header(good, models / "threshold.safetensors", sign=False, threshold=-1.0)
    edit_header(good, models / "orientation.safetensors", sign=False, orientation="RAS")
    edit_header(good, models / "threshold-nan.safetensors", sign=False, threshold=float("nan"))
    edit_header(good, models / "window.safetensors", sign=False,
                     preprocessing={"size": [256, 256], "intensity": {"CT": {"kind": "window", "low": -1000,
                                                                              "high": 1000}}})
    edit_header(good, models / "no-weights-digest.safetensors", sign=False, weights_sha256="")
    edit_header(good, models / "bad-orientation.safetensors", orientation="XYZ")
    edit_header(good, models / "version-1.safetensors", sign=False, format_version=1, digest="")
    edit_header(good, models / "future.safetensors", sign=False, format_version=99)
    edit_header(good, models / "rolled.safetensors", config={**read_checkpoint_info(good).config,
                                                             "width_first_roll": 2})
    edit_header(good, models / "other-architecture.safetensors", architecture="unetr")
    edit_header(good, models / "hub-encoder.safetensors",
                     text_encoder={"source": "hf:textseg-tests/no-such-encoder", "max_tokens": 128})
    torch.save({"w": torch.zeros(2)}, models / "model.pt")
    (models / "folder.safetensors").mkdir()

    manifest = inputs / "unlabelled.csv"
    manifest.write_text(f"case,image,text\nslab,slab.nrrd,{PROMPT}\n")
    (inputs / "latin-1.csv").write_bytes(f"case,image,text\nslab,slab.nrrd,{PROMPT} \xe9\n".encode("latin-1"))
    (inputs / "lists.jsonl").write_text(f'["slab.nrrd", "{PROMPT}"]\n')
    label_seg = inputs / "slab_label.seg.nrrd"
    label = read_volume(inputs / "slab_label.nrrd")
    write_seg_nrrd(label_seg, [SegmentSpec(label.array != 0, "lesion", (1.0, 0.0, 0.0))], label)
    victim = root / "victim" / "keep.safetensors"
    victim.parent.mkdir()
    victim.write_bytes(b"the user's own file")
    os.mkfifo(inputs / "pipe.nrrd")  # reading a FIFO waits for a writer for ever
    os.mkfifo(models / "pipe.safetensors")
    sitk.WriteImage(sitk.Cast(slab[:64, :64, :], sitk.sitkInt16), str(inputs / "scaled.nii"))
    header = bytearray((inputs / "scaled.nii").read_bytes())
    (inputs / "inf-slope.nii").write_bytes(header[:112] + struct.pack("<f", math.inf) + header[116:])
    with gzip.open(inputs / "inf-inter.nii.gz", "wb") as handle:
        handle.write(header[:116] + struct.pack("<f", -math.inf) + header[120:])
    return root


class Checked:
    """Runs a case and checks what every refused case must satisfy."""

    def __init__(self, root: Path, capsys, monkeypatch, tmp_path: Path):
        self.root, self.capsys = root, capsys
        self.out = tmp_path / "out"
        self.out.mkdir()
        self.tmp = tmp_path
        monkeypatch.chdir(self.out)  # outputs without -o land in the current folder: watched too
        self.models_dir = tmp_path / "user-models"
        self.models_dir.mkdir()
        monkeypatch.setenv("TEXTSEG_MODELS_DIR", str(self.models_dir))

    def snapshot(self) -> dict[Path, str]:
        files = {p for p in every_file(self.root) | every_file(self.tmp)}
        return {p: sha256(p) if p.is_file() else "folder" for p in files}

    def refused(self, args, status: int, fragment: str, in_process: bool = True, env=None, preexec=None) -> str:
        before = self.snapshot()
        named = [Path(a) for a in args if isinstance(a, Path) and a.is_file()]
        named_before = [sha256(p, fresh=True) for p in named]
        if in_process:
            code = main([str(a) for a in args])
            captured = self.capsys.readouterr()
            stdout, stderr = captured.out, captured.err
        else:
            done = subprocess.run([TEXTSEG, *map(str, args)], capture_output=True, encoding="utf-8",
                                  errors="replace", env=env, preexec_fn=preexec, timeout=300)
            code, stdout, stderr = done.returncode, done.stdout, done.stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert code == status, (stdout, stderr)
        assert len(lines) == 1, stderr
        assert fragment in lines[0], lines[0]
        assert lines[0].startswith("textseg") and ": error: " in lines[0]
        assert "Traceback" not in stdout + stderr
        assert not any(line.startswith("Wrote ") for line in stdout.splitlines())
        assert self.snapshot() == before  # nothing written, nothing left, every input byte-identical
        assert [sha256(p, fresh=True) for p in named] == named_before  # the files it was given, hashed again
        return lines[0]


@pytest.fixture
def check(world, capsys, monkeypatch, tmp_path) -> Checked:
    return Checked(world, capsys, monkeypatch, tmp_path)


def i(world: Path, name: str) -> Path:
    return world / "inputs" / name


def m(world: Path, name: str) -> Path:
    return world / "inputs" / "models" / f"{name}.safetensors"


SEGMENT_CASES = {
    # inputs
    "missing input": (lambda w: ["segment", i(w, "nope.nrrd")], "File not found"),
    "not an image": (lambda w: ["segment", i(w, "garbage.nrrd")], "Cannot read"),
    "empty file": (lambda w: ["segment", i(w, "empty.nrrd")], "Cannot read"),
    "4D image": (lambda w: ["segment", i(w, "4d.nrrd")], "is 4D"),
    "vector image": (lambda w: ["segment", i(w, "rgb.nrrd")], "values per voxel"),
    "folder without DICOM": (lambda w: ["segment", i(w, "no-dicom")], "No DICOM series"),
    "only NaN voxels": (lambda w: ["segment", i(w, "nan.nrrd")], "no finite value"),
    "second input fails": (lambda w: ["segment", i(w, "slab.nrrd"), i(w, "nan.nrrd")], "nothing was written"),
    # prompts and names
    "empty prompt": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", ""], "prompt is empty"),
    "blank prompt": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", " \t "], "prompt is empty"),
    "punctuation prompt": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "?!… --"], "has no words"),
    "names and prompts": (lambda w: ["segment", i(w, "slab.nrrd"), "--name", "a", "--name", "b"],
                          "one --name per --prompt"),
    "empty name": (lambda w: ["segment", i(w, "slab.nrrd"), "--name", "  "], "--name is empty"),
    "prompt not UTF-8": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "\udcff\udcfe the liver"],
                         "The prompt '\\xff\\xfe the liver' holds bytes that are not UTF-8 text"),
    "prompt with an escape": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "the \x1b[31mliver"],
                              "holds a control character (U+001B)"),
    "prompt with a bell": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "the liver\x07"], "(U+0007)"),
    "prompt with a NUL": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "the\x00liver"], "(U+0000)"),
    "prompt with DEL": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "the liver\x7f"], "(U+007F)"),
    "prompt of 100,000 characters": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "liver " * 16_667],
                                     "has 100002 characters; the limit is 1000"),
    "name not UTF-8": (lambda w: ["segment", i(w, "slab.nrrd"), "--name", "liver\udce9"], "not UTF-8 text"),
    "name with an escape": (lambda w: ["segment", i(w, "slab.nrrd"), "--name", "\x1b[2Jliver"], "(U+001B)"),
    "name too long": (lambda w: ["segment", i(w, "slab.nrrd"), "--name", "x" * 5000], "has 5000 characters"),
    "the same prompt twice": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "the liver", "-p", "the  liver"],
                              "The --prompt 'the liver' is given 2 times"),
    "200 identical prompts": (lambda w: ["segment", i(w, "slab.nrrd"), *["-p", "the liver"] * 200],
                              "is given 200 times"),
    "the same name twice": (lambda w: ["segment", i(w, "slab.nrrd"), "-p", "the liver", "-p", "the spleen",
                                       "--name", "organ", "--name", "organ"], "The --name 'organ' is given 2 times"),
    # inputs that are not images
    "FIFO as input": (lambda w: ["segment", i(w, "pipe.nrrd")], "is a named pipe (FIFO), not a file"),
    "device as input": (lambda w: ["segment", "/dev/zero"], "'/dev/zero' is a device, not a file"),
    "segmentation as input": (lambda w: ["segment", i(w, "slab_label.seg.nrrd"), "-o", w / "x.seg.nrrd"],
                              "is a segmentation (.seg.nrrd), not an image"),
    "NIfTI scaled by inf": (lambda w: ["segment", i(w, "inf-slope.nii")], "scl_slope = inf; the file is damaged"),
    "gzipped NIfTI offset by -inf": (lambda w: ["segment", i(w, "inf-inter.nii.gz")], "scl_inter = -inf"),
    # models
    "empty model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", ""], "-m/--model is empty"),
    "blank model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", "  "], "-m/--model is empty"),
    "model name with an escape": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", "good\x1b"], "(U+001B)"),
    "FIFO as model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "pipe")], "is a named pipe (FIFO)"),
    "device as model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", "/dev/zero"], "is a device, not a file"),
    "unknown model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", "no-such-model"], "No model named"),
    "missing model file": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", "models/nope.safetensors"],
                           "Model file not found"),
    "folder as model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", i(w, "models/folder.safetensors")],
                        "is a folder, not a checkpoint"),
    "pickle as model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", i(w, "models/model.pt")], "PyTorch pickle"),
    "image as model": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", i(w, "brain.nrrd")],
                       "is an image, not a model"),
    "truncated checkpoint": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "truncated")],
                             "damaged or incomplete"),
    "tampered weights": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "tampered-weights")],
                         "modified or damaged"),
    "edited threshold": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "threshold")], "was modified"),
    "threshold set to NaN": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "threshold-nan")], "was modified"),
    "edited orientation": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "orientation")], "was modified"),
    "edited preprocessing": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "window")], "was modified"),
    "blanked weights digest": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "no-weights-digest")],
                               "was modified"),
    "invalid orientation": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "bad-orientation")],
                            "orientation 'XYZ' is not a code"),
    "format version 1": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "version-1")],
                         "sign it: textseg sign"),
    "unknown architecture": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "other-architecture")],
                             "needs the architecture 'unetr'"),
    "picture model on a volume": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", "monuseg-mmrdl"],
                                  "The model monuseg-mmrdl was trained on 2D pictures (RGB), not CT or MR volumes"),
    "config the network refuses": (lambda w: ["segment", i(w, "slab.nrrd"), "-m", m(w, "rolled")],
                                   "cannot build: width_first_roll is -1 or +1, got 2"),
    # options
    "server address not a URL": (lambda w: ["segment", i(w, "slab.nrrd"), "--server", "http://[::1"],
                                 "The server address 'http://[::1' is not a valid address (Invalid IPv6 URL)"),
    "threshold above 1": (lambda w: ["segment", i(w, "slab.nrrd"), "--threshold", "1.5"], "--threshold"),
    "threshold NaN": (lambda w: ["segment", i(w, "slab.nrrd"), "--threshold", "nan"], "--threshold"),
    # outputs
    "output is the input": (lambda w: ["segment", i(w, "slab.nrrd"), "-o", i(w, "slab.nrrd")],
                            "would overwrite its input"),
    "output is a segmentation input": (lambda w: ["segment", i(w, "slab_label.seg.nrrd"), "-o",
                                                  i(w, "slab_label.seg.nrrd")], "is a segmentation (.seg.nrrd)"),
    "same case twice": (lambda w: ["segment", i(w, "slab.nrrd"), i(w, "sub/slab.nrrd")], "Several inputs would write"),
    "several inputs into a file": (lambda w: ["segment", i(w, "slab.nrrd"), i(w, "brain.nrrd"), "-o",
                                              i(w, "garbage.nrrd")], "with several inputs give a folder"),
    "folder is a file": (lambda w: ["segment", i(w, "slab.nrrd"), "-o", i(w, "garbage.nrrd") / "x.seg.nrrd"],
                         "is a file, not a folder"),
    "read-only file system": (lambda w: ["segment", i(w, "slab.nrrd"), "-o", "/proc/textseg-test/x.seg.nrrd"],
                              "is not writable"),
    "probability over an input": (lambda w: ["segment", i(w, "slab.nrrd"), i(w, "slab.1-mass.probability.nrrd"),
                                             "--name", "mass", "--probability", "-o", w / "inputs"], None),
}


def _complete(args: list, world: Path) -> list:
    """Add the prompt, model, output and speed options a case does not set itself."""
    if "-p" not in args:
        args += ["-p", PROMPT]
    if "-m" not in args:
        args += ["-m", m(world, "good")]
    return [*args, "--device", "cpu", "--batch-size", "4", "-q"]


@pytest.mark.parametrize("case", sorted(SEGMENT_CASES))
def test_segment_refuses(case, world, check):
    build, fragment = SEGMENT_CASES[case]
    args = _complete(build(world), world)
    if case == "probability over an input":
        # The probability file the first input would give is the second input.
        taken = i(world, "slab.1-mass.probability.nrrd")
        taken.write_bytes(i(world, "slab.nrrd").read_bytes())
        try:
            check.refused(args, 1, "would overwrite an input")
        finally:
            taken.unlink()
        return
    check.refused(args, 1, fragment)


def test_an_existing_output_is_kept_without_overwrite(world, check):
    existing = check.out / "slab.seg.nrrd"
    existing.write_bytes(b"the user's segmentation")
    check.refused(_complete(["segment", i(world, "slab.nrrd"), "-o", existing], world), 1, "give --overwrite")
    assert existing.read_bytes() == b"the user's segmentation"


def test_overwrite_replaces_and_says_so(world, check, capsys):
    existing = check.out / "brain.seg.nrrd"
    existing.write_bytes(b"old")
    assert main([str(a) for a in _complete(["segment", i(world, "brain.nrrd"), "-o", existing, "--overwrite"],
                                           world)]) == 0
    assert f"Wrote {existing} (replaced the earlier file)" in capsys.readouterr().out
    assert read_seg_nrrd(existing)["segments"][0]["name"] == PROMPT


@pytest.mark.parametrize(("options", "fragment"), [
    (["--batch-size", "0"], "--batch-size: The batch size must be at least 1"),
    (["--device", "bogus"], "--device: Unknown device 'bogus'"),
    (["--device", "cuda:x"], "--device: Unknown device 'cuda:x'"),
    (["--threshold", "0"], "--threshold: The threshold must lie between 0 and 1"),
])
def test_bad_options_are_refused_before_anything_is_read_or_loaded(options, fragment, world, check):
    """The input is missing and the model unknown: the option's message comes first, naming the flag."""
    check.refused(["segment", i(world, "nope.nrrd"), "-p", PROMPT, "-m", "no-such-model", *options], 1, fragment)
    if "--threshold" not in options:
        check.refused(["evaluate", "--manifest", i(world, "unlabelled.csv"), "-m", "no-such-model", *options], 1,
                      fragment)


@pytest.mark.parametrize(("args", "fragment"), [
    (["demo", "--device", "bogus"], "--device: Unknown device 'bogus'"),
    (["demo", "-m", ""], "-m/--model is empty"),
    (["evaluate", "--manifest", "nope.csv", "-m", ""], "-m/--model is empty"),
])
def test_demo_and_evaluate_check_their_options_first(args, fragment, check):
    """Refused before the demo case is read or a model loads (the demo's output folder is never made)."""
    check.refused(args, 1, fragment)


@pytest.mark.parametrize(("args", "fragment"), [
    (["segment", "x.nrrd", "-p", "p", "-m", "m", "--modality", "PET"], "invalid choice: 'PET'"),
    (["segment", "x.nrrd", "-m", "m"], "the following arguments are required: -p/--prompt"),
    (["segment", "x.nrrd", "-p", "p", "-m", "m", "--no-such-option"], "unrecognized arguments"),
    (["segment", "x.nrrd", "-p", "p", "-m", "m", "--threshold", "half"], "invalid float value"),
])
def test_command_line_errors_are_one_line(args, fragment, check):
    with pytest.raises(SystemExit) as stop:
        main(args)
    captured = check.capsys.readouterr()
    assert stop.value.code == 2
    assert len(captured.err.splitlines()) == 1 and fragment in captured.err, captured.err
    assert captured.err.startswith("textseg") and ": error: " in captured.err and "usage:" not in captured.err


# ------------------------------------------------------------------------------------------------- evaluate


def test_evaluate_never_writes_over_its_inputs(world, check):
    label = i(world, "slab_label.nrrd")
    prediction = i(world, "slab_label.seg.nrrd")
    for option in ("--json", "--csv", "--markdown"):
        check.refused(["evaluate", prediction, label, option, label], 1, "would overwrite an input")


EVALUATE_CASES = {
    "manifest without labels": (lambda w, o: ["evaluate", "--manifest", i(w, "unlabelled.csv"), "-m", m(w, "good"),
                                              "--device", "cpu"], "None of the 1 case(s)"),
    "missing manifest": (lambda w, o: ["evaluate", "--manifest", i(w, "nope.csv"), "-m", m(w, "good")],
                         "Manifest not found"),
    "different grids": (lambda w, o: ["evaluate", i(w, "slab_label.seg.nrrd"), i(w, "brain.nrrd")],
                        "different grids"),
    "unknown segment": (lambda w, o: ["evaluate", i(w, "slab_label.seg.nrrd"), i(w, "slab_label.nrrd"),
                                      "--segment", "liver"], "no segment named 'liver'"),
    "two tables one file": (lambda w, o: ["evaluate", i(w, "slab_label.seg.nrrd"), i(w, "slab_label.nrrd"),
                                          "--json", o / "t.txt", "--csv", o / "t.txt"], "given for two outputs"),
    "table folder is a file": (lambda w, o: ["evaluate", i(w, "slab_label.seg.nrrd"), i(w, "slab_label.nrrd"),
                                             "--json", i(w, "garbage.nrrd") / "t.json"], "is a file, not a folder"),
    "table exists": (lambda w, o: ["evaluate", i(w, "slab_label.seg.nrrd"), i(w, "slab_label.nrrd"), "--csv",
                                   i(w, "unlabelled.csv")], "give --overwrite"),
    "manifest not UTF-8": (lambda w, o: ["evaluate", "--manifest", i(w, "latin-1.csv"), "-m", m(w, "good")],
                           "is not UTF-8 text; save the manifest as UTF-8"),
    "JSON line not an object": (lambda w, o: ["evaluate", "--manifest", i(w, "lists.jsonl"), "-m", m(w, "good")],
                                "line 1: not a JSON object"),
    "FIFO as prediction": (lambda w, o: ["evaluate", i(w, "pipe.nrrd"), i(w, "slab_label.nrrd")],
                           "pipe.nrrd' is a named pipe (FIFO)"),
    "FIFO as reference": (lambda w, o: ["evaluate", i(w, "slab_label.seg.nrrd"), i(w, "pipe.nrrd")],
                          "pipe.nrrd' is a named pipe (FIFO)"),
    "FIFO as manifest": (lambda w, o: ["evaluate", "--manifest", i(w, "pipe.nrrd"), "-m", m(w, "good")],
                         "pipe.nrrd' is a named pipe (FIFO)"),
    "NaN validation fraction": (lambda w, o: ["evaluate", "--manifest", i(w, "unlabelled.csv"), "-m", m(w, "good"),
                                              "--split", "val", "--val-fraction", "nan"],
                                "fractions must be at least 0 and leave cases to train on"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_refuses(case, world, check):
    build, fragment = EVALUATE_CASES[case]
    check.refused(build(world, check.out), 1, fragment)


def test_a_missing_table_folder_is_created(world, check, capsys):
    table = check.out / "reports" / "new" / "t.json"
    assert main(["evaluate", str(i(world, "slab_label.seg.nrrd")), str(i(world, "slab_label.nrrd")),
                 "--json", str(table)]) == 0
    assert json.loads(table.read_text())["cases"][0]["dice"] == 1.0
    assert f"Wrote {table}" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------- import


@pytest.mark.parametrize("model_id", ["../victim/keep", "sub/dir", ".hidden", "", "two words", "a\\b"])
def test_import_ids_are_names_never_paths(model_id, world, check):
    check.refused(["import", m(world, "good"), "--id", model_id], 1, "is not a name")
    assert (world / "victim" / "keep.safetensors").read_bytes() == b"the user's own file"
    assert list(check.models_dir.iterdir()) == []


@pytest.mark.parametrize("command", ["import", "sign"])
def test_import_and_sign_refuse_a_fifo(command, world, check):
    check.refused([command, m(world, "pipe")], 1, "is a named pipe (FIFO), not a file")


def test_import_into_a_read_only_models_folder_says_so(world, check, monkeypatch):
    """It said "Free some space" (a failed write's only advice), after checking the whole checkpoint."""
    monkeypatch.setenv("TEXTSEG_MODELS_DIR", "/sys/textseg-models")
    line = check.refused(["import", m(world, "good")], 1, "the folder '/sys' is not writable")
    assert "Free some space" not in line


def test_import_into_a_models_folder_blocked_by_a_file_says_so(world, check):
    blocker = check.tmp / "models-file"
    blocker.write_bytes(b"not a folder")
    line = check.refused(["--models-dir", blocker, "import", m(world, "good")], 1,
                         f"{str(blocker)!r} is a file, not a folder")
    assert "Free some space" not in line


def test_import_refuses_a_modified_checkpoint(world, check):
    check.refused(["import", m(world, "threshold"), "--id", "edited"], 1, "was modified")


def test_demo_refuses_an_output_folder_that_is_a_file_before_it_segments(world, check):
    check.refused(["demo", "-o", i(world, "garbage.nrrd"), "--device", "cpu", "-q"], 1,
                  f"'{i(world, 'garbage.nrrd')}' is a file, not a folder")


# ----------------------------------------------------------------------------------------------------- sign


SIGN_CASES = {
    "missing checkpoint": (lambda w: ["sign", w / "inputs" / "models" / "nope.safetensors"], "Model file not found"),
    "pickle": (lambda w: ["sign", i(w, "models/model.pt")], "PyTorch pickle"),
    "weights not as recorded": (lambda w: ["sign", m(w, "tampered-weights")], "do not match the checksum"),
    "newer format": (lambda w: ["sign", m(w, "future")], "version 99, which this TextSeg"),
    "copy exists": (lambda w: ["sign", m(w, "version-1"), w / "victim" / "keep.safetensors"], "give --overwrite"),
}


@pytest.mark.parametrize("case", sorted(SIGN_CASES))
def test_sign_refuses(case, world, check):
    build, fragment = SIGN_CASES[case]
    check.refused(build(world), 1, fragment)


# ---------------------------------------------------------------------------------------------------- serve


@pytest.mark.parametrize(("args", "fragment"), [
    (["--port", "70000"], "--port 70000 is not a port number; give one from 1 to 65535 (0 picks a free one)."),
    (["--max-request-mb", "nan"], "--max-request-mb nan is not a positive number of megabytes."),
    (["--max-request-mb", "-1"], "--max-request-mb -1.0 is not a positive number of megabytes."),
    (["--port", "99999"], "--port 99999 is not a port number; give one from 1 to 65535 (0 picks a free one)."),
    (["--port", "-1"], "--port -1 is not a port number; give one from 1 to 65535 (0 picks a free one)."),
    (["--max-request-mb", "inf"], "--max-request-mb inf is not a positive number of megabytes."),
    (["--max-request-mb", "1e999"], "--max-request-mb inf is not a positive number of megabytes."),
    (["--max-queued", "0"], "--max-queued 0 is not a positive whole number of jobs."),
    (["--max-queued", "-3"], "--max-queued -3 is not a positive whole number of jobs."),
    (["--result-ttl", "nan"], "--result-ttl nan is not a positive number of seconds."),
    (["--result-ttl", "inf"], "--result-ttl inf is not a positive number of seconds."),
    (["--result-ttl", "0"], "--result-ttl 0.0 is not a positive number of seconds."),
    (["--read-timeout", "0"], "--read-timeout 0.0 is not a positive number of seconds."),
    (["--host", "192.0.2.1", "--token", "secret", "--port", "0"],  # TEST-NET-1: no computer has it
     "Cannot listen on 192.0.2.1:0 (Cannot assign requested address); choose another --host."),
])
def test_serve_refuses(args, fragment, check):
    assert check.refused(["serve", *args], 1, fragment) == f"textseg: error: {fragment}"


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_web_refuses_a_port_that_is_none(port, check):
    check.refused(["web", "--port", port], 1, f"--port {port} is not a port number; give one from 1 to 65535")


# ------------------------------------------------------------------------------------------ real subprocesses


def test_the_console_script_refuses_in_one_line(world, check):
    """A representative set through the installed ``textseg`` script: the same one line, no traceback."""
    assert TEXTSEG.exists()
    check.refused(_complete(["segment", i(world, "rgb.nrrd")], world), 1, "values per voxel", in_process=False)
    check.refused(_complete(["segment", i(world, "slab.nrrd"), "-m", m(world, "orientation")], world), 1,
                  "was modified", in_process=False)
    check.refused(["import", m(world, "good"), "--id", "../victim/keep"], 1, "is not a name", in_process=False)
    check.refused(["segment", "x.nrrd", "-m", "m"], 2, "required: -p/--prompt", in_process=False)


def test_an_unreachable_text_encoder_fails_at_once(world, check):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    line = check.refused(_complete(["segment", i(world, "slab.nrrd"), "-m", m(world, "hub-encoder")], world), 1,
                         "'hf:textseg-tests/no-such-encoder' is not in the local Hugging Face cache",
                         in_process=False, env=env)
    assert "local folder" in line
    assert time.perf_counter() - started < 30  # was about 50 s of retries


def test_a_write_that_fails_half_way_leaves_nothing(world, check):
    """The .seg.nrrd fits a 64 kB file size limit, its probability volume does not: the run fails in the second
    write (SimpleITK's, whose error named its own source file), after segmenting, and the .seg.nrrd already written
    to its temporary file goes too. One reason, said once, without SimpleITK's internals."""

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    line = check.refused(_complete(["segment", i(world, "brain.nrrd"), "--probability", "-o",
                                    check.out / "brain.seg.nrrd"], world), 1, "Cannot write", in_process=False,
                         preexec=limit_file_size)
    assert "probability.nrrd" in line and line.count("Cannot write") == 1 and ".cxx" not in line, line
    assert line.endswith("this process's limit (ulimit -f) allows; choose another output; nothing was written.")


def test_a_failed_write_of_the_segmentation_is_said_once(world, check):
    """The .seg.nrrd's own writer writes through a temporary file too: its failure was wrapped twice ("Cannot write
    ...: Cannot write ...: File too large. Free some space ... Free some space ..."). In this process, under a 1 kB
    file size limit (Python ignores SIGXFSZ: the write fails with EFBIG)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 10, hard))
    try:
        line = check.refused(_complete(["segment", i(world, "brain.nrrd"), "-o", check.out / "brain.seg.nrrd"],
                                       world), 1, "Cannot write")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert line == (f"textseg: error: Cannot write {str(check.out / 'brain.seg.nrrd')!r}: the file is larger than "
                    "the file system or this process's limit (ulimit -f) allows; choose another output; nothing was "
                    "written.")


OUT_OF_MEMORY = """
import resource, sys
from TextSegLib.app.cli import main
from TextSegLib.engine.loading import load_model
import tqdm  # imported by `segment` at its start: loaded before the limit like torch and the model

load_model(sys.argv[1], "cpu")
size = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (size + (600 << 20), resource.RLIM_INFINITY))
sys.exit(main(["segment", *sys.argv[2:], "-m", sys.argv[1]]))
"""


def test_running_out_of_memory_is_one_line_that_says_what_to_do(world, check, data_dir):
    """A real run out of memory: the whole lung2 CT in batches of 64 slices with 600 MB of address space left once
    torch and the model are loaded (batches of one slice fit). One line saying what to do, nothing written."""
    before = check.snapshot()
    done = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY, str(m(world, "good")),
                           str(data_dir / "lung2_image.nrrd"), "-p", PROMPT, "-o", str(check.out), "--device", "cpu",
                           "--batch-size", "64", "-q"],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "textseg: error: The computer ran out of memory while segmenting; close other programs, give a smaller batch "
        "size, or segment on a GPU; nothing was written."]
    assert check.snapshot() == before


def _start(world: Path, out: Path, stage: str | None, extra=()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if stage:
        env["TEXTSEG_DEBUG_PAUSE"] = stage
    args = _complete(["segment", i(world, "brain.nrrd"), "--probability", "-o", out / "brain.seg.nrrd", *extra],
                     world)
    return subprocess.Popen([TEXTSEG, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            encoding="utf-8", errors="replace", env=env)


def _wait_for(process: subprocess.Popen, text: str) -> None:
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"the process ended before printing {text!r}: {process.stderr.read()}")


def test_interrupts_leave_nothing(world, check):
    """SIGTERM while an input is read, SIGINT after the first batch of slices, and both once the outputs sit in
    their temporary files: one line, exit 130 / 143, no file left, inputs untouched. The four runs go at once."""
    before = check.snapshot()
    runs = {}
    for stage, sig in (("reading", signal.SIGTERM), ("segmenting", signal.SIGINT), ("writing", signal.SIGINT),
                       ("writing", signal.SIGTERM)):
        out = check.out / f"{stage}-{sig.name}"
        out.mkdir()
        runs[stage, sig] = out, _start(world, out, stage)
    for (stage, sig), (out, process) in runs.items():
        _wait_for(process, f"paused at {stage}")
        if stage == "writing":  # the outputs exist, as hidden temporary files
            assert sorted(p.name.startswith(".brain.") for p in out.iterdir()) == [True, True]
        process.send_signal(sig)
    for (stage, sig), (out, process) in runs.items():
        _, stderr = process.communicate(timeout=120)
        expected = ("textseg: interrupted (Ctrl-C); nothing was written." if sig == signal.SIGINT
                    else "textseg: terminated (SIGTERM); nothing was written.")
        assert process.returncode == (130 if sig == signal.SIGINT else 143), (stage, stderr)
        assert stderr.splitlines() == [expected], stage
        assert list(out.iterdir()) == [], stage
        out.rmdir()
    assert check.snapshot() == before


def test_of_two_runs_writing_one_file_the_second_to_finish_keeps_the_first_s(world, check, capsys):
    """Two runs without --overwrite, one output: both found it free at their start. The first to finish writes it;
    the other, held with its outputs (the .seg.nrrd and a probability volume) in temporary files, then finds the
    .seg.nrrd there and says so in one line, and puts neither file (before, both said "Wrote" and the second
    replaced the first's file)."""
    target = check.out / "brain.seg.nrrd"
    held = _start(world, check.out, "writing")  # writes brain.seg.nrrd and its probability; waits with them
    _wait_for(held, "paused at writing")
    args = _complete(["segment", i(world, "brain.nrrd"), "-o", target, "--name", "first", "--probability"], world)
    assert main([str(a) for a in args]) == 0
    assert f"Wrote {target}" in capsys.readouterr().out
    first = {p: sha256(p, fresh=True) for p in check.out.iterdir() if not p.name.startswith(".")}
    assert len(first) == 2
    held.send_signal(signal.SIGUSR1)  # ends the pause: it now puts its outputs in place
    stdout, stderr = held.communicate(timeout=120)
    assert held.returncode == 1, stderr
    assert stderr.splitlines() == [
        f"textseg: error: {str(target)!r} appeared while TextSeg was working (another run writing the same file?); "
        "it was left as it is and nothing was written."]
    assert "Wrote" not in stdout and "Traceback" not in stderr
    assert {p: sha256(p, fresh=True) for p in check.out.iterdir()} == first  # the first run's files, nothing else
    assert read_seg_nrrd(target)["segments"][0]["name"] == "first"


KILLED_WRITER = """
import sys, time
from TextSegLib.core.files import OutputTransaction

transaction = OutputTransaction(overwrite=False)
transaction.add(sys.argv[1], lambda temporary: open(temporary, "w").write("half"))
print("written", flush=True)
time.sleep(60)
"""


def test_a_killed_run_s_temporary_files_are_removed_by_the_next_run(world, check, capsys):
    """A writer killed with SIGKILL (nothing can clean up after it) leaves its temporary file; the next run writing
    that output removes the files of processes no longer running, with one warning line each, and leaves those of
    a running process (this one) and any other file alone."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:32] or "host"
    target = check.out / "brain.seg.nrrd"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE,
                              encoding="utf-8")
    assert killed.stdout.readline() == "written\n"
    killed.kill()
    killed.communicate(timeout=60)
    (stale,) = check.out.iterdir()
    assert stale.name.startswith(f".brain.seg.nrrd.{killed.pid}@{host}-") and stale.read_text() == "half"
    running = check.out / f".brain.seg.nrrd.{os.getpid()}@{host}-x1.tmp.seg.nrrd"
    other = check.out / ".brain.seg.nrrd.notes.txt"
    for path in (running, other):
        path.write_bytes(b"kept")
    assert main([str(a) for a in _complete(["segment", i(world, "brain.nrrd"), "-o", target], world)]) == 0
    assert capsys.readouterr().err.splitlines() == [
        f"textseg: WARNING: Removed {stale}, a temporary file left by an interrupted run (process {killed.pid})."]
    assert sorted(check.out.iterdir()) == sorted([other, running, target])
    assert running.read_bytes() == other.read_bytes() == b"kept"
    for path in (running, other, target):
        path.unlink()


def test_sigterm_after_the_model_line_without_a_pause(world, check, data_dir):
    """No debugging aid: SIGTERM as soon as the model is loaded, while the full lung2 is read or segmented."""
    out = check.out / "lung2"
    out.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = ["segment", data_dir / "lung2_image.nrrd", "-p", PROMPT, "-m", m(world, "good"), "-o", out,
            "--probability", "--device", "cpu", "--batch-size", "1", "-q"]
    process = subprocess.Popen([TEXTSEG, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               encoding="utf-8", errors="replace", env=env)
    digest = sha256(data_dir / "lung2_image.nrrd")
    _wait_for(process, "Model good on cpu")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and stderr.splitlines() == ["textseg: terminated (SIGTERM); nothing was written."]
    assert list(out.iterdir()) == []
    assert sha256(data_dir / "lung2_image.nrrd") == digest


# ------------------------------------------------------------------------------------------ non-finite voxels


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_nan_slices_are_missing_and_the_rest_is_segmented(world, small_checkpoint):
    """NaN and inf in three slices: those voxels stay outside the mask, every other slice gets exactly the mask
    it gets without them (TexLiverNet segments slice by slice, the CT window is fixed), and the count is said."""
    clean = read_volume(i(world, "slab.nrrd"))
    array = clean.array.astype(np.float32)
    array[2] = np.nan
    array[3, :100] = np.inf
    array[4, 50:60] = -np.inf
    dirty = clean.with_array(array)
    engine = InferenceEngine(load_model(small_checkpoint, "cpu"), batch_size=4, amp=False)
    expected = engine.segment(clean.with_array(clean.array.astype(np.float32)), PROMPT, modality="CT")
    records = _Records()
    logging.getLogger("textseg").addHandler(records)
    try:
        result = engine.segment(dirty, PROMPT, probability=True, modality="CT")
    finally:
        logging.getLogger("textseg").removeHandler(records)
    bad = ~np.isfinite(array)
    count = int(bad.sum())
    assert count == 512 * 512 + 100 * 512 + 10 * 512
    assert result.mask[bad].sum() == 0 and np.all(np.isfinite(result.probability))
    keep = [k for k in range(array.shape[0]) if k not in (2, 3, 4)]
    assert expected.mask[keep].sum() > 0
    np.testing.assert_array_equal(result.mask[keep], expected.mask[keep])
    assert result.notes == [f"{count} voxels of {clean.source} are NaN or infinite; they were treated as missing "
                            f"(given the lowest finite value, {float(np.nanmin(array[np.isfinite(array)])):g}, "
                            "for the network) and left outside the segment."]
    assert records.messages == result.notes  # also logged as a warning


def test_the_command_reports_nan_voxels_in_one_warning(world, check, capsys):
    slab = sitk.ReadImage(str(i(world, "slab.nrrd")))
    array = sitk.GetArrayFromImage(slab).astype(np.float32)
    array[5] = np.nan
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(slab)
    path = check.tmp / "holes.nrrd"
    sitk.WriteImage(image, str(path))
    assert main([str(a) for a in _complete([
        "segment", path, "-o", check.out / "holes.seg.nrrd"], world)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"textseg: WARNING: {512 * 512} voxels of {path} are NaN or infinite; they were treated as missing (given "
        f"the lowest finite value, {float(array[np.isfinite(array)].min()):g}, for the network) and left outside "
        "the segment."]
    mask = read_seg_nrrd(check.out / "holes.seg.nrrd")
    assert mask["voxels"][..., 5].sum() == 0


# ------------------------------------------------------------------------------------------------- library


def _library_cases(world: Path, engine: InferenceEngine):
    volume = read_volume(i(world, "slab.nrrd"))

    def like(array):
        return Volume(array, volume.spacing, volume.origin, volume.direction, source="test array")

    return {
        "plain array": (lambda: engine.segment(volume.array, PROMPT), TypeError, "Expected a TextSegLib Volume"),
        "2D array": (lambda: engine.segment(like(volume.array[0]), PROMPT), ValueError, "has 2 dimensions"),
        "4D array": (lambda: engine.segment(like(volume.array[None]), PROMPT), ValueError, "has 4 dimensions"),
        "bool array": (lambda: engine.segment(like(volume.array > 0), PROMPT), ValueError, "True/False"),
        "complex array": (lambda: engine.segment(like(volume.array.astype(np.complex64)), PROMPT), ValueError,
                          "complex values"),
        "zero slices": (lambda: engine.segment(like(volume.array[:0]), PROMPT), ValueError, "is empty"),
        "zero spacing": (lambda: engine.segment(Volume(volume.array, (0.0, 1.0, 1.0), volume.origin,
                                                       volume.direction), PROMPT), ValueError, "above 0 mm"),
        "only NaN": (lambda: engine.segment(like(np.full((2, 8, 8), np.nan, np.float32)), PROMPT), ValueError,
                     "no finite value"),
        "bytes prompt": (lambda: engine.segment(volume, PROMPT.encode()), TypeError, "The prompt is bytes"),
        "no words": (lambda: engine.segment(volume, "..."), ValueError, "has no words"),
        "threshold 5": (lambda: engine.segment(volume, PROMPT, threshold=5), ValueError, "between 0 and 1"),
        "threshold text": (lambda: engine.segment(volume, PROMPT, threshold="0.5"), TypeError, "must be a number"),
        "modality": (lambda: engine.segment(volume, PROMPT, modality="PET"), ValueError, "'CT', 'MR' or None"),
        "batch size 0": (lambda: InferenceEngine(engine.models, batch_size=0), ValueError, "at least 1"),
        "batch size 2.5": (lambda: InferenceEngine(engine.models, batch_size=2.5), TypeError, "whole number"),
        "name with a line break": (lambda: write_seg_nrrd(world / "x.seg.nrrd", [SegmentSpec(
            volume.array > 0, "two\nlines", (1.0, 0.0, 0.0))], volume), ValueError, "control character"),
        "import id path": (lambda: Catalogue(world / "user").import_model(m(world, "good"), "../victim/keep"),
                           CheckpointError, "is not a name"),
        "edited threshold": (lambda: load_checkpoint(m(world, "threshold")), CheckpointError, "was modified"),
        "prompt with undecodable bytes": (lambda: engine.segment(volume, "the liver\udcff"), ValueError,
                                          "holds bytes that are not UTF-8 text"),
        "prompt with an escape": (lambda: engine.segment(volume, "the \x1bliver"), ValueError, "(U+001B)"),
        "prompt of 5000 characters": (lambda: engine.segment(volume, "a" * 5000), ValueError,
                                      "has 5000 characters; the limit is 1000"),
        "FIFO as volume": (lambda: read_volume(i(world, "pipe.nrrd")), ValueError, "is a named pipe (FIFO)"),
        "FIFO as checkpoint": (lambda: load_checkpoint(m(world, "pipe")), CheckpointError, "is a named pipe (FIFO)"),
        "NIfTI scaled by inf": (lambda: read_volume(i(world, "inf-slope.nii")), ValueError, "scl_slope = inf"),
        "segmentation as volume": (lambda: read_volume(i(world, "slab_label.seg.nrrd")), ValueError,
                                   "is a segmentation (.seg.nrrd), not an image"),
    }


LIBRARY_CASES = ["plain array", "2D array", "4D array", "bool array", "complex array", "zero slices", "zero spacing",
                 "only NaN", "bytes prompt", "no words", "threshold 5", "threshold text", "modality", "batch size 0",
                 "batch size 2.5", "name with a line break", "import id path", "edited threshold",
                 "prompt with undecodable bytes", "prompt with an escape", "prompt of 5000 characters",
                 "FIFO as volume", "FIFO as checkpoint", "NIfTI scaled by inf", "segmentation as volume"]


@pytest.fixture(scope="module")
def engine(small_checkpoint) -> InferenceEngine:
    return InferenceEngine(load_model(small_checkpoint, "cpu"), batch_size=4)


@pytest.mark.parametrize("case", LIBRARY_CASES)
def test_the_library_validates_its_arguments(case, world, engine):
    call, kind, fragment = _library_cases(world, engine)[case]
    before = {p: sha256(p) for p in every_file(world) if p.is_file()}
    with pytest.raises(kind) as raised:
        call()
    assert isinstance(raised.value, TextSegError)
    assert fragment in str(raised.value) and "\n" not in str(raised.value)
    assert {p: sha256(p) for p in every_file(world) if p.is_file()} == before


# --------------------------------------------------------------------------------------- names in any language

NAMES = ["Läsion rechts", "the patient’s liver", "右肺下叶肿块", "tumeur hépatique 🫁", "lung | 100%"]


def test_names_and_prompts_in_any_language_round_trip(world, tmp_path, capsys):
    """Through ``textseg segment``: read back exactly by slicerio (``read_seg_nrrd``) and by slicer-core's
    ``vtkMRMLSegmentationStorageNode``, and found by name by ``textseg evaluate --segment``."""
    out = tmp_path / "names.seg.nrrd"
    args = ["segment", i(world, "brain.nrrd"), "-m", m(world, "good"), "-o", out, "--device", "cpu", "--batch-size",
            "4", "-q"]
    for number, name in enumerate(NAMES):
        args += ["-p", f"{name} ({number})", "--name", name]
    assert main([str(a) for a in args]) == 0, capsys.readouterr().err
    assert "Läsion rechts" in capsys.readouterr().out
    read = read_seg_nrrd(out)
    assert [s["name"] for s in read["segments"]] == NAMES
    assert [decode_tag(s["tags"][TAG_PROMPT]) for s in read["segments"]] == [f"{n} ({k})" for k, n in
                                                                            enumerate(NAMES)]
    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(out))
    assert storage.ReadData(node)
    segments = [node.GetSegmentation().GetNthSegment(n) for n in range(len(NAMES))]
    assert [s.GetName() for s in segments] == NAMES
    import vtk

    for number, (segment, name) in enumerate(zip(segments, NAMES, strict=True)):
        value = vtk.reference("")
        assert segment.GetTag(TAG_PROMPT, value) and decode_tag(str(value)) == f"{name} ({number})"
    code = main(["evaluate", str(out), str(out), "--segment", "右肺下叶肿块", "--reference-segment", "Läsion rechts"])
    assert code == 0, capsys.readouterr().err


def test_a_file_slicer_writes_with_such_names_reads_back_exactly(tmp_path):
    """The other direction: slicer-core's storage node writes the names, read_seg_nrrd reads the same text."""
    import vtk
    from vtkmodules.util import numpy_support

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    for name in NAMES:
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(4, 4, 4)
        image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ones(64, np.uint8), deep=True,
                                                                   array_type=vtk.VTK_UNSIGNED_CHAR))
        segment_id = node.AddSegmentFromBinaryLabelmapRepresentation(image, name, [1.0, 0.0, 0.0])
        node.GetSegmentation().GetSegment(segment_id).SetTag(TAG_PROMPT, encode_tag(name))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)
    read = read_seg_nrrd(tmp_path / "slicer.seg.nrrd")
    assert [s["name"] for s in read["segments"]] == NAMES
    assert [decode_tag(s["tags"][TAG_PROMPT]) for s in read["segments"]] == NAMES


def _write_series(image, folder: Path, series: str, slices) -> None:
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(map(str, image.GetDirection()[0:9:3] + image.GetDirection()[1:9:3]))
    for k in slices:
        item = sitk.Cast(image[:, :, k], sitk.sitkInt16)
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", series), ("0020|0013", str(k)), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k)))))):
            item.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series}-{k}.dcm"))
        writer.Execute(item)


def test_a_folder_of_two_dicom_series_warns_once(world, tmp_path, capfd):
    """The header check and the read each warned: the same line twice."""
    brain = sitk.ReadImage(str(i(world, "brain.nrrd")))
    folder = tmp_path / "two-series"
    folder.mkdir()
    _write_series(brain, folder, "1.2.826.0.1.3680043.2.1125.2", range(4))
    _write_series(brain, folder, "1.2.826.0.1.3680043.2.1125.3", range(2))
    capfd.readouterr()
    assert main(["segment", str(folder), "-p", PROMPT, "-m", str(m(world, "good")), "-o",
                 str(tmp_path / "d.seg.nrrd"), "--device", "cpu", "-q"]) == 0
    assert capfd.readouterr().err.splitlines() == [
        f"textseg: WARNING: {folder} holds 2 DICOM series; using the largest (4 files). Put one series per folder to "
        "choose."]


def test_a_dicom_series_with_a_missing_slice_gives_one_warning_line(world, tmp_path, capfd):
    """ITK warns about the gap in several lines on the process's stderr; textseg says it in one line."""
    brain = sitk.ReadImage(str(i(world, "brain.nrrd")))
    folder = tmp_path / "dicom"
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    orientation = "\\".join(map(str, brain.GetDirection()[0:9:3] + brain.GetDirection()[1:9:3]))
    for k in (0, 1, 3):  # slice 2 is missing
        item = sitk.Cast(brain[:, :, k], sitk.sitkInt16)
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.2"), ("0020|0013", str(k)),
                           ("0020|0037", orientation),
                           ("0020|0032", "\\".join(map(str, brain.TransformIndexToPhysicalPoint((0, 0, k)))))):
            item.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{k}.dcm"))
        writer.Execute(item)
    capfd.readouterr()
    assert main(["segment", str(folder), "-p", PROMPT, "-m", str(m(world, "good")), "-o",
                 str(tmp_path / "d.seg.nrrd"), "--device", "cpu", "-q"]) == 0
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"textseg: WARNING: The DICOM series in {folder} has unevenly spaced slices (6.5 to 13 mm "
                          "apart; slices missing?); it is segmented as if they were "), err
