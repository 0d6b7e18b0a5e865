"""The ``textseg`` command: list models, segment volumes from text prompts, evaluate segmentations, sign checkpoints.

Errors caused by the input (a missing file, an empty prompt, a damaged checkpoint, an output that cannot be
written, ...) raise a :class:`~TextSegLib.core.errors.TextSegError`, reported in one line on stderr with the exit
code 1 (2 for a command line argparse cannot parse). Any other exception is a fault in TextSeg or a library under
it: one line names it as unexpected and asks for a report, also with the exit code 1. ``--debug`` shows the full
traceback of either instead. Ctrl-C (SIGINT) and SIGTERM end a run with one line and the exit codes 130 and 143.

``segment`` and ``evaluate`` write all their outputs or none: everything is checked first (inputs, prompts,
options, that no output is an input, that no output exists unless ``--overwrite`` is given, that each output's
folder is writable), then every output is written to a hidden temporary file beside its target, and the targets
are put in place only when every input has been segmented and every file written. A failure or an interrupt at
any point removes the temporary files, so a failed run leaves no file behind; inputs are only ever read.

``TEXTSEG_DEBUG_PAUSE=reading|segmenting|writing`` is a debugging and testing aid: ``segment`` stops for up to
60 s when it starts reading an input, after the first batch of slices of a prompt, or when an input's outputs are
written to their temporary files but not yet put in place, and says so on stdout (the tests send signals there).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from TextSegLib import __version__
from TextSegLib.core.errors import TextSegError
from TextSegLib.core.files import OutputTransaction, check_writable
from TextSegLib.core.messages import describe_fault, first_line
from TextSegLib.core.options import MODALITIES, SegmentOptions, check_batch_size, check_device, check_threshold
from TextSegLib.core.settings import (
    DEBUG_PAUSE_VARIABLE,
    DEFAULT_HOST,
    DEFAULT_MAX_REQUEST_MB,
    MODELS_DIR_VARIABLE,
    SERVE_PORT,
    TOKEN_VARIABLE,
    WEB_PORT,
    debug_pause,
    environment_token,
)
from TextSegLib.io.volumes import case_name

log = logging.getLogger("textseg")

class UsageError(TextSegError, ValueError):
    """A command line that cannot be carried out as given."""


class _Terminated(BaseException):
    """SIGTERM, raised where the program is when it arrives (like KeyboardInterrupt for SIGINT)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _stage(stage: str, what: str) -> None:
    """Log a stage of ``segment`` (shown with --debug) and pause there when ``TEXTSEG_DEBUG_PAUSE`` names it."""
    log.info("%s %s", stage, what)
    if debug_pause() == stage:
        print(f"textseg: debug: paused at {stage} {what} ({DEBUG_PAUSE_VARIABLE})", flush=True)
        time.sleep(60)


_Checked = TypeVar("_Checked")


def _option(flag: str, check: Callable[[object], _Checked], value: object) -> _Checked:
    """``check(value)`` (one of :mod:`TextSegLib.core.options`' checks), its error a :class:`UsageError` naming
    ``flag``."""
    try:
        return check(value)
    except TextSegError as error:
        raise UsageError(f"{flag}: {error}") from None


def _segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The run's options from the command line, each checked (a bad one is a :class:`UsageError` naming its flag)
    before anything is read or loaded."""
    threshold = getattr(args, "threshold", None)
    return SegmentOptions(
        device=_option("--device", check_device, args.device),
        batch_size=_option("--batch-size", check_batch_size, args.batch_size),
        threshold=None if threshold is None else _option("--threshold", check_threshold, threshold),
        probability=getattr(args, "probability", False),
        modality=getattr(args, "modality", None),
        fp32=getattr(args, "fp32", False),
        compile=getattr(args, "compile", False),
    )


def _check_outputs(outputs: Sequence[Path], inputs: Sequence[Path], overwrite: bool) -> None:
    """Before any work: no output is an input or given twice, none exists unless ``overwrite``, and each one's
    folder is writable."""
    taken = {path.resolve(): path for path in inputs}
    seen: set[Path] = set()
    for path in outputs:
        resolved = path.resolve()
        if resolved in taken:
            raise UsageError(f"The output {str(path)!r} would overwrite an input; choose another output name.")
        if resolved in seen:
            raise UsageError(f"{str(path)!r} is given for two outputs; give distinct names.")
        seen.add(resolved)
        if path.exists() and not overwrite:
            raise UsageError(f"{str(path)!r} exists; give --overwrite to replace it, or choose another output.")
        check_writable(path)


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].lower() or "segment"


class _Said(logging.Filter):
    """What this run has said on stderr (log records as they pass the handler, and notes), so that a result's note
    that was also logged as a warning where it arose, in this process, is not said twice."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        self.messages.add(record.getMessage())
        return True

    def note(self, message: str) -> None:
        """Say ``message`` as ``textseg: note: ...`` unless it was said already."""
        if message not in self.messages:
            self.messages.add(message)
            print(f"textseg: note: {message}", file=sys.stderr, flush=True)


_SAID = _Said()


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("textseg: %(levelname)s: %(message)s"))
    _SAID.messages.clear()
    handler.addFilter(_SAID)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


# ---------------------------------------------------------------------------------------------------- models


def cmd_models(args: argparse.Namespace) -> int:
    from TextSegLib.engine.catalogue import Catalogue

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
    from TextSegLib.engine.catalogue import Catalogue

    entry = Catalogue(args.models_dir).import_model(args.checkpoint, args.id)
    print(f"Imported {entry.id} ({entry.architecture_title}) to {entry.path}")
    return 0


# --------------------------------------------------------------------------------------------------- segment


def _output_paths(inputs: Sequence[Path], output: Path | None) -> list[Path]:
    if output is not None and any(output.resolve() == path.resolve() for path in inputs):
        raise UsageError(f"--output {str(output)!r} would overwrite its input; name a new .seg.nrrd file or a folder.")
    if len(inputs) == 1 and output is not None and output.name.endswith(".seg.nrrd"):
        return [output]
    folder = output or Path.cwd()
    if folder.exists() and not folder.is_dir():
        if len(inputs) == 1:
            raise UsageError(f"--output {str(folder)!r} is a file that is not a .seg.nrrd; name a .seg.nrrd file or "
                             "a folder.")
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
    for name in cleaned:
        if any(ord(c) < 32 or ord(c) == 127 for c in name):
            raise UsageError(f"The --name {name!r} holds a control character; give a plain name.")
    return cleaned


def _progress_bar(total: int, label: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="slice", disable=quiet or None, leave=False, file=sys.stderr)


def _segmenter(args: argparse.Namespace, options: SegmentOptions):
    """``(segment(volume, prompt, progress) -> result, description)``: in this process, or on ``--server``; both
    choose the device and fall back to the CPU the same way (:class:`~TextSegLib.engine.run.Segmenter`)."""
    if args.server:
        from TextSegLib.service.client import RemoteWorker
        from TextSegLib.service.protocol import SegmentRequest, WorkerError

        worker = RemoteWorker(args.server, args.token or environment_token())
        worker.health()

        def remote(volume, prompt: str, progress):
            request = SegmentRequest(prompt, list(args.model), options.device, options.batch_size, options.threshold,
                                     options.probability, options.modality, options.fp32)
            job = worker.submit(volume, request)
            try:
                result = job.wait(progress)
            except BaseException:  # Ctrl-C, SIGTERM, a lost connection: the server stops the job too
                job.cancel()
                raise
            if result is None:
                raise WorkerError("The job was cancelled on the server; nothing was written.")
            return result

        return remote, f"{'+'.join(args.model)} on {worker.describe()}"

    from TextSegLib.engine.catalogue import Catalogue
    from TextSegLib.engine.run import Segmenter

    segmenter = Segmenter(args.model, options, Catalogue(args.models_dir))
    return segmenter.segment, segmenter.describe()


def _reporter(bar, label: str):
    """Progress callback: moves the bar; after the first batch it is the ``segmenting`` stage."""
    started = []

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if not started:
            started.append(True)
            _stage("segmenting", label)

    return report


def _probability_path(target: Path, number: int, name: str) -> Path:
    return target.with_name(f"{case_name(target)}.{number}-{_slug(name)}.probability.nrrd")


def cmd_segment(args: argparse.Namespace) -> int:
    from TextSegLib.core.options import validate_prompt
    from TextSegLib.io.segnrrd import segment_for_result, write_seg_nrrd
    from TextSegLib.io.volumes import check_volume_file, read_volume, write_image

    options = _segment_options(args)
    prompts = [validate_prompt(p) for p in args.prompt]
    names = _segment_names(prompts, args.name)
    inputs = [Path(p) for p in args.inputs]
    for path in inputs:
        check_volume_file(path)
    outputs = _output_paths(inputs, Path(args.output) if args.output else None)
    probability_paths = [[_probability_path(target, number, name) for number, name in enumerate(names, start=1)]
                         if args.probability else [] for target in outputs]
    models_given = [Path(m) for m in args.model if Path(m).exists()]
    every_output = [*outputs, *(p for paths in probability_paths for p in paths)]
    _check_outputs(every_output, [*inputs, *models_given], args.overwrite)
    existing = {path for path in every_output if path.exists()}

    segment, where = _segmenter(args, options)
    print(f"Model {where}", flush=True)

    args.outputs_started = True
    with OutputTransaction() as transaction:
        for source, target, probability_targets in zip(inputs, outputs, probability_paths, strict=True):
            _stage("reading", str(source))
            volume = read_volume(source, modality=args.modality)
            segments, probabilities = [], []
            for index, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
                label = f"{case_name(source)}: {name}"
                bar = _progress_bar(0, f"{case_name(source)}: {name[:30]}", args.quiet)
                try:
                    result = segment(volume, prompt, _reporter(bar, label))
                finally:
                    bar.close()
                assert result is not None  # nothing cancels a command-line run
                for note in result.notes:  # a device note holds for every result: said once
                    _SAID.note(note)
                segments.append(segment_for_result(result, name, index))
                if args.probability:
                    probabilities.append(result.probability)
                print(f"{case_name(source)}: {name!r}: {result.voxel_count} voxels ({result.volume_ml:.1f} mL) "
                      f"in {result.seconds:.1f} s; {result.presence}", flush=True)
            transaction.add(target, lambda temporary, s=segments, v=volume: write_seg_nrrd(temporary, s, v))
            for path, probability in zip(probability_targets, probabilities, strict=True):
                transaction.add(path, lambda temporary, p=probability, v=volume: write_image(temporary, p, v))
            _stage("writing", str(target))
    for path in transaction.committed:
        print(f"Wrote {path}" + (" (replaced the earlier file)" if path in existing else ""))
    return 0


# ------------------------------------------------------------------------------------------------------ sign


def cmd_sign(args: argparse.Namespace) -> int:
    from TextSegLib.engine.checkpoints import sign_checkpoint

    if args.signed_copy:
        _check_outputs([Path(args.signed_copy)], [Path(args.checkpoint)], args.overwrite)
    signed = sign_checkpoint(args.checkpoint, args.signed_copy)
    print(f"Signed {signed.path} (SHA-256 {signed.sha256})")
    return 0


# ----------------------------------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from TextSegLib.service.server import serve

    serve(args.host, args.port, args.token, args.max_request_mb, args.models_dir, args.ready_line,
          args.exit_with_stdin)
    return 0


# ------------------------------------------------------------------------------------------------------- web


def cmd_web(args: argparse.Namespace) -> int:
    try:
        from TextSegLib.app.web import serve_web
    except ImportError as error:
        raise UsageError(f"textseg web needs trame-slicer ({error.name} is missing): pip install "
                         "'textseg[web]'.") from None
    serve_web(args.host, args.port, args.server, args.token or environment_token(), args.models_dir)
    return 0


# -------------------------------------------------------------------------------------------------- evaluate


def _files(path: Path) -> list[Path]:
    """A file, or the files of a folder (what an evaluation reads)."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from TextSegLib.evaluation import tables as evaluation

    options = _segment_options(args)
    tables = [(Path(option), render) for option, render in (
        (args.json, evaluation.to_json), (args.csv, evaluation.to_csv), (args.markdown, evaluation.to_markdown))
        if option]
    read = [Path(p) for p in (args.manifest, args.prediction, args.reference) if p and Path(p).exists()]
    if args.manifest and Path(args.manifest).is_file():
        from TextSegLib.io.manifests import read_manifest

        read += [p for case in read_manifest(args.manifest) for p in (case.image, case.label) if p is not None]
    _check_outputs([path for path, _ in tables], [f for p in read for f in _files(p)], args.overwrite)
    if args.manifest:
        if args.prediction or args.reference:
            raise UsageError("Give either --manifest (with --model) or a prediction and a reference, not both.")
        if not args.model:
            raise UsageError("--manifest needs --model: the model whose segmentations are evaluated.")
        from TextSegLib.engine.catalogue import Catalogue
        from TextSegLib.engine.run import Segmenter
        from TextSegLib.io.manifests import read_manifest, split_cases

        cases = read_manifest(args.manifest)
        if args.split:
            train, val = split_cases(cases, args.val_fraction, args.split_seed)
            cases = train if args.split == "train" else val
        segmenter = Segmenter(args.model, options, Catalogue(args.models_dir))
        rows = evaluation.evaluate_manifest(segmenter, cases, progress=lambda case: print(f"Segmenting {case}",
                                                                                           file=sys.stderr))
        for note in segmenter.notes:  # where it ran: as segment says it
            _SAID.note(note)
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
    with OutputTransaction() as transaction:
        for path, render in tables:
            text = render(rows, summary)
            transaction.add(path, lambda temporary, text=text: Path(temporary).write_text(text, encoding="utf-8"))
    for path in transaction.committed:
        print(f"Wrote {path}")
    return 0


# ------------------------------------------------------------------------------------------------------ demo


def cmd_demo(args: argparse.Namespace) -> int:
    from TextSegLib.evaluation.demo import run_demo

    bar = _progress_bar(0, "segmenting", args.quiet)

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        run_demo(Path(args.output), args.device, args.model, args.case, progress=report)
    finally:
        bar.close()
    return 0


# ------------------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="textseg", description="Text-guided segmentation of CT and MR volumes.")
    parser.add_argument("--version", action="version", version=f"textseg {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--models-dir", help=f"folder of imported models (default: ${MODELS_DIR_VARIABLE} or "
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
    segment.add_argument("--modality", choices=MODALITIES, help="override the guess from the intensities")
    segment.add_argument("--fp32", action="store_true", help="compute in fp32 (default: bf16/fp16 where the GPU or "
                         "CPU has it; masks agree to Dice > 0.99)")
    segment.add_argument("--compile", action="store_true", help="torch.compile the networks first (tens of "
                         "seconds; pays off for many or large volumes)")
    segment.add_argument("--server", help="segment on a TextSeg worker service (`textseg serve`) at this URL, "
                         f"e.g. http://gpu-server:{SERVE_PORT}; models are the server's")
    segment.add_argument("--token", help=f"the server's token (default: ${TOKEN_VARIABLE})")
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    segment.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: "
                         "refuse to start)")
    segment.set_defaults(func=cmd_segment)

    serve = sub.add_parser("serve", help="run the segmentation worker as an HTTP service (for 3D Slicer on another "
                           "computer, or `textseg segment --server`)")
    serve.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this "
                       "computer only; any other address needs --token)")
    serve.add_argument("--port", type=int, default=SERVE_PORT, help=f"port (default {SERVE_PORT}; 0 picks a free one)")
    serve.add_argument("--token", help=f"token every client must send (default: ${TOKEN_VARIABLE})")
    serve.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB,
                       help=f"largest request accepted, in MB (default {DEFAULT_MAX_REQUEST_MB})")
    serve.add_argument("--ready-line", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--exit-with-stdin", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=cmd_serve)

    web = sub.add_parser("web", help="segment in a web browser, with Slicer's slice and 3D views")
    web.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this "
                     "computer only; the page has no log-in, see the README before using another)")
    web.add_argument("--port", type=int, default=WEB_PORT, help=f"port (default {WEB_PORT}; 0 picks a free one)")
    web.add_argument("--server", help="segment on a TextSeg worker service (`textseg serve`) at this URL "
                     "(default: a worker process on this computer)")
    web.add_argument("--token", help=f"the server's token (default: ${TOKEN_VARIABLE})")
    web.set_defaults(func=cmd_web)

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
    evaluate.add_argument("--overwrite", action="store_true", help="replace table files that exist (default: "
                          "refuse to start)")
    evaluate.set_defaults(func=cmd_evaluate)

    from TextSegLib.evaluation.demo import CASE_DIRS, DEFAULT_CASE, DEMO_MODEL

    demo = sub.add_parser("demo", help="segment a bundled real CT by name with the shipped model and score it")
    demo.add_argument("-o", "--output", default="textseg-demo", help="folder for the .seg.nrrd and the PNG")
    demo.add_argument("--case", default=DEFAULT_CASE, choices=sorted(CASE_DIRS),
                      help="abdomen (default: patient B, held out, twelve structures by name) or lung2 (a lesion)")
    demo.add_argument("-m", "--model", default=DEMO_MODEL, help="catalogue id or checkpoint")
    demo.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)

    importer = sub.add_parser("import", help="add a checkpoint to your models folder")
    importer.add_argument("checkpoint", help="a TextSeg .safetensors checkpoint")
    importer.add_argument("--id", help="catalogue id (default: the file name)")
    importer.set_defaults(func=cmd_import)

    sign = sub.add_parser("sign", help="record the digest of a checkpoint's settings: for a checkpoint saved before "
                          "TextSeg recorded it, or after a deliberate edit (only for files you trust)")
    sign.add_argument("checkpoint", metavar="CHECKPOINT", help="a TextSeg .safetensors checkpoint (replaced by the "
                      "signed one)")
    sign.add_argument("signed_copy", metavar="SIGNED_COPY", nargs="?", help="write the signed checkpoint here "
                      "instead")
    sign.add_argument("--overwrite", action="store_true", help="replace SIGNED_COPY if it exists (default: refuse "
                      "to start)")
    sign.set_defaults(func=cmd_sign)
    return parser


def _on_signal(number: int, frame) -> None:
    """Turn SIGINT and SIGTERM into exceptions where the program is, so that every ``finally`` and every output
    transaction cleans up; further signals are ignored while it does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if number == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Terminated


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except (KeyboardInterrupt, _Terminated) as stop:
        if args.debug:
            raise
        sigint = isinstance(stop, KeyboardInterrupt)
        what = "interrupted (Ctrl-C)" if sigint else "terminated (SIGTERM)"
        after = "; nothing was written" if args.command in ("segment", "evaluate", "import", "sign") else ""
        print(f"textseg: {what}{after}.", file=sys.stderr)
        return 130 if sigint else 143
    except Exception as error:
        if args.debug:
            raise
        print(f"textseg: error: {_error_line(error, getattr(args, 'outputs_started', False))}", file=sys.stderr)
        return 1


def _error_line(error: Exception, outputs_started: bool) -> str:
    """What ``textseg: error:`` says: a :class:`TextSegError`'s first line (the user's problem, worded for the user);
    anything else is a fault in TextSeg or a library under it, named as one. Once outputs were started it also says
    that nothing was written (the transaction took everything back)."""
    if isinstance(error, TextSegError):
        message = first_line(error)
        if outputs_started and not message.endswith("nothing was written."):
            message = f"{message.rstrip('.')}; nothing was written."
        return message
    written = "; nothing was written" if outputs_started else ""
    return (f"unexpected {describe_fault(error).rstrip('.')}{written} (a fault in TextSeg or a library; run again "
            "with --debug for the traceback and report it)")


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # names and prompts in any language never fail to print
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(verbose=getattr(args, "debug", False))
    if args.command in ("segment", "evaluate"):
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's multi-line warnings; errors still reach us
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {number: signal.signal(number, _on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


if __name__ == "__main__":
    sys.exit(main())
