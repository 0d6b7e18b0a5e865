"""The ``textseg`` command: list models, segment volumes from text prompts, evaluate segmentations.

Errors caused by the input (a missing file, an empty prompt, a damaged checkpoint, ...) are reported in one line
on stderr, the exit code is 1 and no output file is written. ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .volumes import case_name

log = logging.getLogger("textseg")

class UsageError(ValueError):
    """A command line that cannot be carried out as given."""


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].lower() or "segment"


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("textseg: %(levelname)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


# ---------------------------------------------------------------------------------------------------- models


def cmd_models(args: argparse.Namespace) -> int:
    from .checkpoints import Catalogue

    entries = Catalogue(args.models_dir).entries()
    if args.json:
        print(json.dumps([
            {
                "id": e.id, "name": e.title, "architecture": e.info.architecture, "description": e.info.description,
                "example_prompts": e.info.example_prompts, "text_role": e.text_role,
                "text_encoder": e.info.text_encoder.get("source"),
                "path": str(e.path), "shipped": e.shipped,
            }
            for e in entries
        ], indent=2))
        return 0
    if not entries:
        print("No models found. Import one with `textseg import <checkpoint.safetensors>`.")
        return 0
    for entry in entries:
        where = "shipped" if entry.shipped else "imported"
        print(f"{entry.id}  ({entry.architecture_title}, {where})")
        if entry.info.name and entry.info.name != entry.id:
            print(f"    {entry.info.name}")
        if entry.info.description:
            print(f"    {entry.info.description}")
        for prompt in entry.info.example_prompts[:3]:
            print(f"    e.g. \"{prompt}\"")
        if entry.text_role:
            print(f"    text: {entry.text_role}")
        print(f"    text encoder: {entry.info.text_encoder.get('source')}; file: {entry.path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .checkpoints import Catalogue

    entry = Catalogue(args.models_dir).import_model(args.checkpoint, args.id)
    print(f"Imported {entry.id} ({entry.architecture_title}) to {entry.path}")
    return 0


# --------------------------------------------------------------------------------------------------- segment


def _output_paths(inputs: Sequence[Path], output: Path | None) -> list[Path]:
    if len(inputs) == 1 and output is not None and output.name.endswith(".seg.nrrd"):
        return [output]
    folder = output or Path.cwd()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output {str(folder)!r} is a file; with several inputs give a folder.")
    if output is not None and output.suffix and not output.exists():
        raise UsageError(f"--output {str(output)!r}: name a .seg.nrrd file (one input) or a folder.")
    paths = [folder / f"{case_name(path)}.seg.nrrd" for path in inputs]
    duplicates = {p for p in paths if paths.count(p) > 1}
    if duplicates:
        raise UsageError(f"Several inputs would write {sorted(map(str, duplicates))[0]}; give distinct file names.")
    return paths


def _segment_names(prompts: list[str], names: list[str] | None) -> list[str]:
    if not names:
        return prompts
    if len(names) != len(prompts):
        raise UsageError(f"Give one --name per --prompt ({len(prompts)} prompts, {len(names)} names).")
    cleaned = [" ".join(name.split()) for name in names]
    if not all(cleaned):
        raise UsageError("A --name is empty; give each segment a name or leave --name out.")
    return cleaned


def _progress_bar(total: int, label: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="slice", disable=quiet or None, leave=False, file=sys.stderr)


def cmd_segment(args: argparse.Namespace) -> int:
    from .checkpoints import Catalogue
    from .inference import InferenceEngine, load_model
    from .segmentations import segment_for_result, write_seg_nrrd
    from .text import validate_prompt
    from .volumes import check_volume_file, read_volume, write_image

    prompts = [validate_prompt(p) for p in args.prompt]
    names = _segment_names(prompts, args.name)
    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        check_volume_file(path)
    outputs = _output_paths(inputs, Path(args.output) if args.output else None)
    for source, target in zip(inputs, outputs, strict=True):
        if source.resolve() == target.resolve():
            raise UsageError(f"The output {str(target)!r} would overwrite its input.")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise UsageError("--threshold must lie between 0 and 1.")

    catalogue = Catalogue(args.models_dir)
    models = [load_model(name, args.device, catalogue) for name in args.model]
    engine = InferenceEngine(models, batch_size=args.batch_size, amp=not args.fp32, compile=args.compile)
    model_label = "+".join(m.id for m in models)
    print(f"Model {model_label} on {engine.device}", file=sys.stderr)

    for source, target in zip(inputs, outputs, strict=True):
        volume = read_volume(source, modality=args.modality)
        segments, probabilities = [], []
        for index, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
            bar = _progress_bar(0, f"{case_name(source)}: {name[:30]}", args.quiet)
            def report(done: int, total: int, bar=bar) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()
            result = engine.segment(volume, prompt, threshold=args.threshold, probability=args.probability,
                                    progress=report, modality=args.modality)
            bar.close()
            assert result is not None  # no cancel token is passed
            segments.append(segment_for_result(result, name, index))
            if args.probability:
                probabilities.append((name, result.probability))
            spacing = np.prod(volume.spacing)
            line = (f"{case_name(source)}: {name!r}: {result.voxel_count} voxels "
                    f"({result.voxel_count * spacing / 1000.0:.1f} mL) in {result.seconds:.1f} s")
            if result.empty:
                line += " - nothing found above the threshold; the segment is empty"
            print(line)
        write_seg_nrrd(target, segments, volume)
        print(f"Wrote {target}")
        for number, (name, probability) in enumerate(probabilities, start=1):
            path = target.with_name(f"{case_name(target)}.{number}-{_slug(name)}.probability.nrrd")
            write_image(path, probability, volume)
            print(f"Wrote {path}")
    return 0


# -------------------------------------------------------------------------------------------------- evaluate


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluation

    if args.manifest:
        if args.prediction or args.reference:
            raise UsageError("Give either --manifest (with --model) or a prediction and a reference, not both.")
        if not args.model:
            raise UsageError("--manifest needs --model: the model whose segmentations are evaluated.")
        from .checkpoints import Catalogue
        from .inference import InferenceEngine, load_model
        from .manifests import read_manifest, split_cases

        cases = read_manifest(args.manifest)
        if args.split:
            train, val = split_cases(cases, args.val_fraction, args.split_seed)
            cases = train if args.split == "train" else val
        catalogue = Catalogue(args.models_dir)
        engine = InferenceEngine([load_model(name, args.device, catalogue) for name in args.model],
                                 batch_size=args.batch_size)
        rows = evaluation.evaluate_manifest(engine, cases, progress=lambda case: print(f"Segmenting {case}",
                                                                                        file=sys.stderr))
    else:
        if not (args.prediction and args.reference):
            raise UsageError("Give a prediction and a reference (files or folders), or --manifest with --model.")
        prediction, reference = Path(args.prediction), Path(args.reference)
        if prediction.is_dir() != reference.is_dir():
            raise UsageError("Give two files or two folders to compare.")
        if prediction.is_dir():
            pairs = evaluation.match_folders(prediction, reference)
            if not pairs:
                raise UsageError(f"No file in {str(prediction)!r} matches a file in {str(reference)!r} by case name.")
        else:
            pairs = [(evaluation.case_name(reference), prediction, reference)]
        rows = evaluation.evaluate_pairs(pairs, args.segment, args.reference_segment)
    summary = evaluation.summarise(rows)
    print(evaluation.to_text(rows, summary))
    for option, render in ((args.json, evaluation.to_json), (args.csv, evaluation.to_csv),
                           (args.markdown, evaluation.to_markdown)):
        if option:
            Path(option).write_text(render(rows, summary))
    return 0


# ------------------------------------------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    bar = _progress_bar(0, "segmenting", args.quiet)

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        run_demo(Path(args.output), args.device, args.model, progress=report)
    finally:
        bar.close()
    return 0


# ------------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="textseg", description="Text-guided segmentation of CT and MR volumes.")
    parser.add_argument("--version", action="version", version=f"textseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--models-dir", help="folder of imported models (default: $TEXTSEG_MODELS_DIR or "
                        "~/.local/share/textseg/models)")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list the models you can use")
    models.add_argument("--json", action="store_true", help="machine-readable output")
    models.set_defaults(func=cmd_models)

    segment = sub.add_parser("segment", help="segment volumes from text prompts, one segment per prompt")
    segment.add_argument("inputs", nargs="+", help="volume files (NRRD, NIfTI, MHA) or DICOM series folders")
    segment.add_argument("-p", "--prompt", action="append", required=True,
                         help="what to segment; repeat for several segments")
    segment.add_argument("-m", "--model", action="append", required=True,
                         help="catalogue id or checkpoint file; repeat to average an ensemble")
    segment.add_argument("-o", "--output", help="a .seg.nrrd file (one input) or a folder (default: current folder)")
    segment.add_argument("--name", action="append", help="segment name per prompt (default: the prompt)")
    segment.add_argument("--probability", action="store_true", help="also write each probability volume")
    segment.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    segment.add_argument("--batch-size", type=int, help="slices per forward pass (default: chosen for the device)")
    segment.add_argument("--threshold", type=float, help="probability threshold (default: the model's, 0.5)")
    segment.add_argument("--modality", choices=["CT", "MR"], help="override the guess from the intensities")
    segment.add_argument("--fp32", action="store_true", help="compute in fp32 (default: bf16/fp16 where the GPU or "
                         "CPU has it; masks agree to Dice > 0.99)")
    segment.add_argument("--compile", action="store_true", help="torch.compile the networks first (tens of "
                         "seconds; pays off for many or large volumes)")
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    segment.set_defaults(func=cmd_segment)

    evaluate = sub.add_parser("evaluate", help="compare predictions with references (files, folders, or a "
                              "dataset manifest segmented by a model)")
    evaluate.add_argument("prediction", nargs="?", help=".seg.nrrd or label image, or a folder of them")
    evaluate.add_argument("reference", nargs="?", help=".seg.nrrd or label image, or a folder matched by case name")
    evaluate.add_argument("--segment", help="segment name in a prediction .seg.nrrd (default: the first)")
    evaluate.add_argument("--reference-segment", help="segment name in a reference .seg.nrrd (default: the first)")
    evaluate.add_argument("--manifest", help="a dataset manifest (CSV/JSONL): segment its cases with --model")
    evaluate.add_argument("-m", "--model", action="append", help="with --manifest: catalogue id or checkpoint "
                          "(repeat for an ensemble)")
    evaluate.add_argument("--split", choices=["train", "val"], help="with --manifest: only this split (as "
                          "training made it: --val-fraction, --split-seed)")
    evaluate.add_argument("--val-fraction", type=float, default=0.2)
    evaluate.add_argument("--split-seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--json", help="write the table as JSON (inf as null)")
    evaluate.add_argument("--csv", help="write the table as CSV")
    evaluate.add_argument("--markdown", help="write the table as Markdown")
    evaluate.set_defaults(func=cmd_evaluate)

    demo = sub.add_parser("demo", help="segment the bundled real CT case with the demo model and show the result")
    demo.add_argument("-o", "--output", default="textseg-demo", help="folder for the .seg.nrrd and the PNG")
    demo.add_argument("-m", "--model", default="demo-texlivernet-small", help="catalogue id or checkpoint")
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    importer = sub.add_parser("import", help="add a checkpoint to your models folder")
    importer.add_argument("checkpoint", help="a TextSeg .safetensors checkpoint")
    importer.add_argument("--id", help="catalogue id (default: the file name)")
    importer.set_defaults(func=cmd_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .checkpoints import CheckpointError
    from .evaluation import GridMismatchError
    from .manifests import ManifestError
    from .text import PromptError, TextEncoderUnavailableError
    from .volumes import VolumeError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(verbose=getattr(args, "debug", False))
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        return args.func(args)
    except (UsageError, VolumeError, CheckpointError, PromptError, TextEncoderUnavailableError, ManifestError,
            GridMismatchError) as error:
        if args.debug:
            raise
        print(f"textseg: error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        if args.debug:
            raise
        print(f"textseg: error: {str(error).strip().splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
