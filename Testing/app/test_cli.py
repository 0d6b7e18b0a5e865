"""The ``textseg`` command end to end: segment, evaluate, models, import, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from safetensors.torch import load_file, save_file
from testkit import assert_same_grid, read_label, rewrite_metadata

from TextSegLib import __version__
from TextSegLib.app.cli import main
from TextSegLib.evaluation.metrics import evaluate_case
from TextSegLib.io.segnrrd import TAG_CHECKPOINT, TAG_MODEL, TAG_PROMPT, decode_tag

PROMPT = "a large soft-tissue mass in the posterior left lower lung"


@pytest.fixture(scope="module")
def slab(tmp_path_factory, data_dir) -> Path:
    """Twelve real lung2 slices through the lesion, as a file."""
    path = tmp_path_factory.mktemp("inputs") / "lung2_slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))[:, :, 24:36], str(path), True)
    return path


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_lung2_writes_segments_with_geometry_names_and_tags(tmp_path, capsys, data_dir, small_checkpoint):
    out = tmp_path / "out" / "lung2.seg.nrrd"
    code, stdout, _ = run(["segment", data_dir / "lung2_image.nrrd", "-p", PROMPT, "-p", "lung | nodule",
                           "--name", "mass", "--name", "nodule", "-m", small_checkpoint, "-o", out,
                           "--probability", "--batch-size", "16", "--device", "cpu", "-q"], capsys)
    assert code == 0, stdout
    assert f"Wrote {out}" in stdout and "'mass':" in stdout and "mL" in stdout
    assert_same_grid(out, data_dir / "lung2_image.nrrd")
    segmentation = slicerio.read_segmentation(str(out))
    assert [s["name"] for s in segmentation["segments"]] == ["mass", "nodule"]
    first, second = segmentation["segments"]
    assert first["color"] != second["color"]
    assert decode_tag(first["tags"][TAG_PROMPT]) == PROMPT
    assert decode_tag(second["tags"][TAG_PROMPT]) == "lung | nodule"  # a '|' survives the tag encoding
    from TextSegLib.engine.checkpoints import file_sha256

    assert first["tags"][TAG_MODEL] == small_checkpoint.name.removesuffix(".safetensors")
    assert first["tags"][TAG_CHECKPOINT] == file_sha256(small_checkpoint)
    probabilities = sorted(out.parent.glob("*.probability.nrrd"))
    assert [p.name for p in probabilities] == ["lung2.1-mass.probability.nrrd", "lung2.2-nodule.probability.nrrd"]
    assert_same_grid(probabilities[0], data_dir / "lung2_image.nrrd")
    probability = sitk.ReadImage(str(probabilities[0]))
    mask = np.transpose(slicerio.segment_mask(segmentation, first), (2, 1, 0)) != 0
    np.testing.assert_array_equal(mask, sitk.GetArrayFromImage(probability) > 0.5)


def test_the_console_script_runs(tmp_path, slab, small_checkpoint):
    script = Path(sys.executable).parent / "textseg"
    assert script.exists(), "the textseg console script is not installed next to this Python"
    version = subprocess.run([script, "--version"], capture_output=True, encoding="utf-8", errors="replace", check=True)
    assert version.stdout.strip() == f"textseg {__version__}"
    done = subprocess.run([script, "segment", slab, "-p", PROMPT, "-m", small_checkpoint, "-o", tmp_path],
                          capture_output=True, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "lung2_slab.seg.nrrd").is_file()


def test_the_command_ends_without_the_interpreter_s_teardown_and_loses_no_output(tmp_path, slab, small_checkpoint):
    """``textseg`` ends its process at once after a command (issue 25: the teardown cost 1.5 s of a 10 s run):
    output to a file (block-buffered) is complete, exit codes are kept, and with another thread alive the exit
    is a normal one that waits for it (atexit handlers show which)."""
    log = tmp_path / "stdout.txt"
    with log.open("w") as stdout:
        done = subprocess.run([sys.executable, "-m", "TextSegLib", "segment", slab, "-p", PROMPT, "-m",
                               small_checkpoint, "-o", tmp_path / "out.seg.nrrd"], stdout=stdout,
                              stderr=subprocess.PIPE, encoding="utf-8", errors="replace")
    assert done.returncode == 0, done.stderr
    assert log.read_text(encoding="utf-8").splitlines()[-1].startswith("Wrote ")
    failed = subprocess.run([sys.executable, "-m", "TextSegLib", "segment", slab, "-p", PROMPT, "-m",
                             tmp_path / "missing.safetensors", "-o", tmp_path / "other.seg.nrrd"],
                            capture_output=True, encoding="utf-8", errors="replace")
    assert failed.returncode == 1 and len(failed.stderr.strip().splitlines()) == 1, failed.stderr
    ending = ("import atexit, sys, threading, time\n"
              "from TextSegLib.app.cli import end_process\n"
              "atexit.register(print, 'teardown')\n"
              "if sys.argv[1] == 'thread':\n"
              "    threading.Thread(target=time.sleep, args=(0.5,)).start()\n"
              "print('done')\n"
              "end_process(7)\n")
    for thread, printed in (("none", "done"), ("thread", "done\nteardown")):
        ended = subprocess.run([sys.executable, "-c", ending, thread], capture_output=True, text=True)
        assert (ended.returncode, ended.stdout.strip()) == (7, printed), ended.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the GPU would be used")
def test_a_gpu_asked_for_where_there_is_none_means_the_cpu_and_one_note(tmp_path, capsys, slab, small_checkpoint):
    code, stdout, stderr = run(["segment", slab, "-p", PROMPT, "-p", "the left lung", "-m", small_checkpoint,
                                "--device", "cuda:1", "-o", tmp_path, "-q"], capsys)
    assert code == 0, stderr
    assert f"Model {small_checkpoint.name.removesuffix('.safetensors')} on cpu" in stdout
    assert stderr.splitlines() == ["textseg: note: No usable GPU was found; TextSeg runs on the CPU."]


def test_several_inputs_go_to_a_folder(tmp_path, capsys, slab, data_dir, small_checkpoint):
    code, _stdout, _ = run(["segment", slab, data_dir / "breast1_image.nrrd", "-p", "a mass", "-m",
                           small_checkpoint, "-o", tmp_path / "results", "-q"], capsys)
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["breast1_image.seg.nrrd",
                                                                        "lung2_slab.seg.nrrd"]
    breast = slicerio.read_segmentation(str(tmp_path / "results" / "breast1_image.seg.nrrd"))
    assert breast["voxels"].shape == (45, 120, 21)


def test_long_prompts_are_truncated_with_a_warning(tmp_path, capsys, slab, small_checkpoint):
    long_prompt = " ".join([PROMPT] * 16)  # more tokens than the encoder reads, fewer characters than the limit
    code, _, stderr = run(["segment", slab, "-p", long_prompt, "-m", small_checkpoint, "-o", tmp_path, "-q"],
                          capsys)
    assert code == 0
    assert stderr.startswith("textseg: WARNING: The prompt 'a large soft-tissue mass in the ...' is 194 tokens")
    assert "reads at most 128" in stderr and len(stderr.splitlines()) == 1
    assert "posterior" not in stderr  # the long prompt is not repeated
    assert (tmp_path / "lung2_slab.seg.nrrd").is_file()


def four_d_image(path: Path) -> Path:
    sitk.WriteImage(sitk.JoinSeries([sitk.Image([4, 4, 4], sitk.sitkInt16)] * 3), str(path))
    return path


def vector_image(path: Path) -> Path:
    scalar = sitk.Image([4, 4, 4], sitk.sitkUInt8)
    sitk.WriteImage(sitk.Compose(scalar, scalar, scalar), str(path))
    return path


def bad_checkpoints(folder: Path, good: Path) -> dict[str, Path]:
    truncated = folder / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:5000])
    tampered = folder / "tampered.safetensors"
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(good))
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(tampered), metadata=metadata)
    other = folder / "other-architecture.safetensors"
    rewrite_metadata(good, other, architecture="unetr")
    return {"truncated": truncated, "tampered": tampered, "other": other}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing input", "File not found"),
        ("unreadable input", "Cannot read"),
        ("4D input", "is 4D"),
        ("vector input", "values per voxel"),
        ("empty prompt", "prompt is empty"),
        ("blank prompt", "prompt is empty"),
        ("unknown model", "No model named"),
        ("truncated checkpoint", "damaged or incomplete"),
        ("tampered checkpoint", "modified or damaged"),
        ("other architecture", "needs the architecture 'unetr'"),
        ("names do not match prompts", "one --name per --prompt"),
        ("output overwrites input", "overwrite its input"),
        ("threshold out of range", "--threshold"),
        ("compile on a server", "--compile applies to a run in this process"),
    ],
)
def test_bad_input_gives_one_line_a_nonzero_exit_and_writes_nothing(case, message, tmp_path, capsys, slab,
                                                                     small_checkpoint):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    checkpoints = bad_checkpoints(inputs, small_checkpoint)
    garbage = inputs / "garbage.nrrd"
    garbage.write_bytes(b"NRRD0004\nthis is not an image\n")
    image, prompt, model, extra = slab, PROMPT, small_checkpoint, []
    if case == "missing input":
        image = inputs / "nope.nrrd"
    elif case == "unreadable input":
        image = garbage
    elif case == "4D input":
        image = four_d_image(inputs / "4d.nrrd")
    elif case == "vector input":
        image = vector_image(inputs / "rgb.nrrd")
    elif case == "empty prompt":
        prompt = ""
    elif case == "blank prompt":
        prompt = "   \t "
    elif case == "unknown model":
        model = "no-such-model"
    elif case == "truncated checkpoint":
        model = checkpoints["truncated"]
    elif case == "tampered checkpoint":
        model = checkpoints["tampered"]
    elif case == "other architecture":
        model = checkpoints["other"]
    elif case == "names do not match prompts":
        extra = ["--name", "a", "--name", "b"]
    elif case == "output overwrites input":
        image = inputs / "case.nrrd"
        sitk.WriteImage(sitk.ReadImage(str(slab)), str(image))
        out = image
    elif case == "threshold out of range":
        extra = ["--threshold", "1.5"]
    elif case == "compile on a server":  # refused before the server is asked anything (nothing listens there)
        extra = ["--compile", "--server", "http://127.0.0.1:9"]
    before = sorted(p.name for p in (inputs.iterdir()))
    code, _stdout, stderr = run(["segment", image, "-p", prompt, "-m", model, "-o", out, "-q", *extra], capsys)
    assert code == 1
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("textseg: error: "), stderr
    assert message in lines[0]
    if out.is_dir():
        assert list(out.iterdir()) == []
    assert sorted(p.name for p in inputs.iterdir()) == before


def write_label_as_seg(path: Path, label: Path, name: str = "lesion", shift: int = 0) -> None:
    image = sitk.ReadImage(str(label))
    array = np.roll(sitk.GetArrayFromImage(image) != 0, shift, axis=2)
    from TextSegLib.io.segnrrd import SegmentSpec, write_seg_nrrd
    from TextSegLib.io.volumes import Volume

    write_seg_nrrd(path, [SegmentSpec(array.astype(np.uint8), name, (1.0, 0.0, 0.0))], Volume.from_sitk(image))


def test_evaluate_a_pair_and_write_tables(tmp_path, capsys, data_dir):
    label = data_dir / "lung2_label.nrrd"
    prediction = tmp_path / "lung2.seg.nrrd"
    write_label_as_seg(prediction, label, shift=2)
    code, stdout, _ = run(["evaluate", prediction, label, "--json", tmp_path / "m.json", "--csv",
                           tmp_path / "m.csv"], capsys)
    assert code == 0
    reference, spacing = read_label(data_dir, "lung2")
    expected = evaluate_case(np.roll(reference, 2, axis=2), reference, spacing)
    table = json.loads((tmp_path / "m.json").read_text())
    assert table["cases"][0]["case"] == "lung2_label"
    for name in ("dice", "iou", "voe", "ravd", "hd", "hd95", "assd"):
        assert table["cases"][0][name] == pytest.approx(expected[name], abs=1e-9)
    assert f"{expected['dice']:.4f}" in stdout and "Dice Global" in stdout
    assert (tmp_path / "m.csv").read_text().splitlines()[0].startswith("case,dice,iou,voe,ravd,hd,hd95,assd")


def test_evaluate_folders_by_case_name(tmp_path, capsys, data_dir):
    predictions, references = tmp_path / "pred", tmp_path / "ref"
    predictions.mkdir()
    references.mkdir()
    for case in ("brain2", "breast1"):
        label = data_dir / f"{case}_label.nrrd"
        sitk.WriteImage(sitk.ReadImage(str(label)), str(references / f"{case}_label.nrrd"))
        write_label_as_seg(predictions / f"{case}.seg.nrrd", label, shift=1 if case == "brain2" else 0)
    code, _, _ = run(["evaluate", predictions, references, "--json", tmp_path / "m.json"], capsys)
    assert code == 0
    table = json.loads((tmp_path / "m.json").read_text())
    assert [row["case"] for row in table["cases"]] == ["brain2", "breast1"]
    assert table["cases"][1]["dice"] == 1.0 and table["cases"][0]["dice"] < 1.0
    assert table["summary"]["dice"] == pytest.approx((table["cases"][0]["dice"] + 1.0) / 2)


def test_evaluate_rejects_different_grids_and_missing_segments(tmp_path, capsys, data_dir):
    prediction = tmp_path / "brain1.seg.nrrd"
    write_label_as_seg(prediction, data_dir / "brain1_label.nrrd")
    code, _, stderr = run(["evaluate", prediction, data_dir / "lung2_label.nrrd"], capsys)
    assert code == 1 and "different grids" in stderr
    code, _, stderr = run(["evaluate", prediction, data_dir / "brain1_label.nrrd", "--segment", "liver"], capsys)
    assert code == 1 and "no segment named 'liver'" in stderr


def test_models_and_import(tmp_path, capsys, small_checkpoint):
    code, stdout, _ = run(["models"], capsys)
    assert code == 0
    code, stdout, _ = run(["import", small_checkpoint, "--id", "my-liver-model"], capsys)
    assert code == 0 and "Imported my-liver-model (TexLiverNet" in stdout
    code, stdout, _ = run(["models", "--json"], capsys)
    listed = {entry["id"]: entry for entry in json.loads(stdout)}
    assert listed["my-liver-model"]["architecture"] == "texlivernet"
    assert listed["my-liver-model"]["example_prompts"] == [PROMPT]
    assert listed["my-liver-model"]["shipped"] is False
    code, stdout, _ = run(["models"], capsys)
    assert "my-liver-model  (TexLiverNet, imported)" in stdout and f'e.g. "{PROMPT}"' in stdout
    assert "text: The prompt steers the bottleneck through text-image agent attention" in stdout
    assert listed["my-liver-model"]["text_role"].startswith("The prompt steers the bottleneck")
    code, _, stderr = run(["import", small_checkpoint, "--id", "my-liver-model"], capsys)
    assert code == 1 and "already has a model" in stderr


def test_evaluate_a_manifest_with_a_model(tmp_path, capsys, data_dir, annotations, small_checkpoint):
    """Every case segmented with its own text on its own grid, compared with its label; Markdown, CSV and JSON."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("case,image,label,text,modality\n" + "".join(
        f"{c},{data_dir / annotations[c]['image']},{data_dir / annotations[c]['label']},{annotations[c]['prompt']},"
        f"{annotations[c]['modality']}\n" for c in ("brain2", "breast1")))
    device = "cpu" if torch.cuda.is_available() else "cuda"  # no GPU: the CPU, with segment's note
    code, _stdout, stderr = run(["evaluate", "--manifest", manifest, "-m", small_checkpoint, "--device", device,
                                "--markdown", tmp_path / "t.md", "--json", tmp_path / "t.json", "--csv",
                                tmp_path / "t.csv"], capsys)
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if line.startswith("textseg: note: ")]
    assert notes == ([] if device == "cpu" else ["textseg: note: No usable GPU was found; TextSeg runs on the CPU."])
    table = json.loads((tmp_path / "t.json").read_text())
    assert [row["case"] for row in table["cases"]] == ["brain2", "breast1"]
    assert table["cases"][1]["text"] == annotations["breast1"]["prompt"]
    # The same numbers as segmenting and evaluating by hand.
    from TextSegLib.engine.inference import InferenceEngine
    from TextSegLib.engine.loading import load_model
    from TextSegLib.io.volumes import read_volume

    volume = read_volume(data_dir / "breast1_image.nrrd")
    mask = InferenceEngine(load_model(small_checkpoint, "cpu")).segment(volume, annotations["breast1"]["prompt"]).mask
    reference, spacing = read_label(data_dir, "breast1")
    expected = evaluate_case(mask, reference, spacing)
    assert table["cases"][1]["dice"] == pytest.approx(expected["dice"], abs=1e-12)
    overlap = sum(r["overlap_voxels"] for r in table["cases"])
    volumes = sum(r["prediction_voxels"] + r["reference_voxels"] for r in table["cases"])
    assert table["summary"]["dice_global"] == pytest.approx(2 * overlap / volumes)
    markdown = (tmp_path / "t.md").read_text()
    assert markdown.startswith("| case | Dice | IoU | VOE | RAVD | HD (mm) | HD95 (mm) | ASSD (mm) |")
    assert "| **mean** |" in markdown and "Dice Global over 2 case(s)" in markdown
    assert (tmp_path / "t.csv").read_text().count("\n") == 4  # header, two cases, mean
    code, _, stderr = run(["evaluate", "--manifest", manifest], capsys)
    assert code == 1 and "--manifest needs --model" in stderr


def test_sign_upgrades_an_old_checkpoint(tmp_path, capsys, small_checkpoint):
    """``textseg sign``: a format-1 checkpoint (weights digest only) is refused until signed; signing a copy leaves
    the original as it was and keeps an existing copy without --overwrite; signing in place replaces the file."""
    from TextSegLib.engine.checkpoints import file_sha256, read_checkpoint_info

    old = tmp_path / "old.safetensors"
    rewrite_metadata(small_checkpoint, old, sign=False, format_version=1, digest=None)
    original = old.read_bytes()
    code, _, stderr = run(["import", old, "--id", "old"], capsys)
    assert code == 1 and stderr.strip().endswith(f"if you trust the file, sign it: textseg sign {str(old)!r}")
    signed = tmp_path / "signed.safetensors"
    code, stdout, stderr = run(["sign", old, signed], capsys)
    assert code == 0, stderr
    assert stdout.splitlines() == [f"Signed {signed} (SHA-256 {file_sha256(signed)})"]
    assert old.read_bytes() == original
    assert read_checkpoint_info(signed).digest == read_checkpoint_info(small_checkpoint).digest
    code, _, stderr = run(["sign", old, signed], capsys)
    assert code == 1 and "exists; give --overwrite" in stderr
    code, stdout, _ = run(["sign", old], capsys)
    assert code == 0 and stdout.splitlines() == [f"Signed {old} (SHA-256 {file_sha256(old)})"]
    code, stdout, stderr = run(["import", old, "--id", "old"], capsys)
    assert code == 0 and stdout.startswith("Imported old (TexLiverNet"), stderr


@pytest.mark.parametrize(("error", "line"), [
    (KeyError("spacing"), "textseg: error: unexpected KeyError: 'spacing' (a fault in TextSeg or a library; run "
                          "again with --debug for the traceback and report it)"),
    (RuntimeError(), "textseg: error: unexpected RuntimeError (a fault in TextSeg or a library; run again with "
                     "--debug for the traceback and report it)"),
    (ZeroDivisionError("float division by zero\n  in a library's own words"),
     "textseg: error: unexpected ZeroDivisionError: float division by zero (a fault in TextSeg or a library; run "
     "again with --debug for the traceback and report it)"),
    (OSError(5, "Input/output error"), "textseg: error: unexpected OSError: [Errno 5] Input/output error (a fault "
                                       "in TextSeg or a library; run again with --debug for the traceback and "
                                       "report it)"),
])
def test_a_fault_is_one_line_that_names_it_and_debug_shows_its_traceback(error, line, capsys, monkeypatch):
    """What is not a TextSegError is a fault in TextSeg or a library under it, whatever its type (an OSError too):
    one line names it and asks for a report; --debug lets the exception through. The fault is a stand-in (the
    catalogue raises as a bug would): every real one found is a TextSegError now."""
    from TextSegLib.engine.catalogue import Catalogue

    def fail(self):
        raise error

    monkeypatch.setattr(Catalogue, "entries", fail)
    code, stdout, stderr = run(["models"], capsys)
    assert (code, stdout, stderr.splitlines()) == (1, "", [line])
    with pytest.raises(type(error)):
        main(["--debug", "models"])


def test_the_user_s_error_is_its_first_line_only(capsys, monkeypatch):
    from TextSegLib.engine.catalogue import Catalogue
    from TextSegLib.engine.checkpoints import CheckpointError

    def refuse(self):
        raise CheckpointError("The checkpoint 'x' is damaged; copy it again.\nA second line for the log.")

    monkeypatch.setattr(Catalogue, "entries", refuse)
    code, _, stderr = run(["models"], capsys)
    assert (code, stderr) == (1, "textseg: error: The checkpoint 'x' is damaged; copy it again.\n")
    with pytest.raises(CheckpointError):
        main(["--debug", "models"])



def test_components_largest_leaves_one_connected_part(tmp_path, capsys, slab, small_checkpoint):
    from scipy import ndimage

    parts = {}
    for choice in ("all", "largest"):
        code, _, stderr = run(["segment", slab, "-p", PROMPT, "-m", small_checkpoint, "--threshold", "0.3",
                               "--components", choice, "-o", tmp_path / f"{choice}.seg.nrrd", "-q"], capsys)
        assert code == 0, stderr
        segmentation = slicerio.read_segmentation(str(tmp_path / f"{choice}.seg.nrrd"))
        mask = slicerio.segment_mask(segmentation, segmentation["segments"][0]) != 0
        parts[choice] = (int(mask.sum()), ndimage.label(mask, structure=np.ones((3, 3, 3)))[1])
    assert parts["largest"][1] == 1 < parts["all"][1] and parts["largest"][0] < parts["all"][0]
    with pytest.raises(SystemExit) as refused:
        run(["segment", slab, "-p", PROMPT, "-m", small_checkpoint, "--components", "biggest", "-o", tmp_path],
            capsys)
    assert refused.value.code == 2 and "invalid choice: 'biggest'" in capsys.readouterr().err
