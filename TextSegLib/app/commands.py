"""What the ``textseg`` subcommands do, except ``segment`` (:mod:`TextSegLib.app.segmenting`): ``models``,
``import``, ``sign``, ``serve``, ``web``, ``evaluate`` and ``demo``, and what they share: options checked by
:mod:`TextSegLib.core.options` with the flag named, outputs checked before any work, notes said once.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from TextSegLib.core.errors import TextSegError, UsageError
from TextSegLib.core.files import OutputTransaction, check_readable_file, check_writable
from TextSegLib.core.options import (
    SegmentOptions,
    check_batch_size,
    check_device,
    check_port,
    check_positive_number,
    check_text,
    check_threshold,
)
from TextSegLib.core.settings import (
    environment_token,
)

log = logging.getLogger("textseg")

Checked = TypeVar("Checked")


def checked_option(flag: str, check: Callable[[object], Checked], value: object) -> Checked:
    """``check(value)`` (one of :mod:`TextSegLib.core.options`' checks), its error a :class:`UsageError` naming
    ``flag``."""
    try:
        return check(value)
    except TextSegError as error:
        raise UsageError(f"{flag}: {error}") from None


def segment_options(args: argparse.Namespace) -> SegmentOptions:
    """The run's options from the command line, each checked (a bad one is a :class:`UsageError` naming its flag)
    before anything is read or loaded."""
    threshold = getattr(args, "threshold", None)
    return SegmentOptions(
        device=checked_option("--device", check_device, args.device),
        batch_size=checked_option("--batch-size", check_batch_size, args.batch_size),
        threshold=None if threshold is None else checked_option("--threshold", check_threshold, threshold),
        probability=getattr(args, "probability", False),
        modality=getattr(args, "modality", None),
        fp32=getattr(args, "fp32", False),
        compile=getattr(args, "compile", False),
        components=getattr(args, "components", None),
    )


def flagged(flag: str, check: Callable[[object], Checked], value: object) -> Checked:
    """``check(value)``, its error a :class:`UsageError` that starts with ``flag`` (``--port 99999 is not a port
    number; ...``)."""
    try:
        return check(value)
    except TextSegError as error:
        raise UsageError(f"{flag} {error}") from None


def check_models(models: Sequence[str]) -> None:
    """Before anything loads: each ``-m`` names something (a catalogue id or a file), in plain text, and a file
    given is not a FIFO or a device (reading one would wait for ever)."""
    for model in models:
        if not model.strip():
            raise UsageError("-m/--model is empty: give a catalogue id (`textseg models` lists them) or a checkpoint "
                             "file.")
        checked_option("-m/--model", lambda text: check_text(text, "model name"), model)
        checked_option("-m/--model", lambda path: check_readable_file(path, "model"), model)


def check_service_options(args: argparse.Namespace) -> None:
    """``serve`` and ``web``: the port, and the service's limits, each a finite positive number."""
    flagged("--port", check_port, args.port)
    for flag, unit, whole in (("--max-request-mb", "megabytes", False), ("--max-queued", "jobs", True),
                              ("--result-ttl", "seconds", False), ("--read-timeout", "seconds", False)):
        value = getattr(args, flag[2:].replace("-", "_"), None)
        if value is not None:
            flagged(flag, lambda number, unit=unit, whole=whole: check_positive_number(number, unit, whole), value)


def check_outputs(outputs: Sequence[Path], inputs: Sequence[Path], overwrite: bool) -> None:
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


class Notes(logging.Filter):
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


NOTES = Notes()


def progress_bar(total: int, label: str, quiet: bool) -> Any:
    """A progress bar of slices on stderr (a tqdm bar; hidden with ``--quiet`` or when stderr is no terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="slice", disable=quiet or None, leave=False, file=sys.stderr)


def cmd_models(args: argparse.Namespace) -> int:
    from TextSegLib.engine.catalogue import Catalogue

    entries = Catalogue(args.models_dir).entries()
    if args.json:
        print(json.dumps([
            {
                "id": e.id, "name": e.title, "architecture": e.info.architecture, "description": e.info.description,
                "example_prompts": e.info.example_prompts, "text_role": e.text_role,
                "text_encoder": e.info.text_encoder.get("source"), "components": e.info.components,
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
        if entry.info.components == "largest":
            print("    keeps the largest connected part of each mask (--components all keeps every part)")
        print(f"    text encoder: {entry.info.text_encoder.get('source')}; file: {entry.path}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from TextSegLib.engine.catalogue import Catalogue

    check_readable_file(args.checkpoint, "checkpoint")
    entry = Catalogue(args.models_dir).import_model(args.checkpoint, args.id)
    print(f"Imported {entry.id} ({entry.architecture_title}) to {entry.path}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from TextSegLib.engine.checkpoints import sign_checkpoint

    check_readable_file(args.checkpoint, "checkpoint")
    if args.signed_copy:
        check_outputs([Path(args.signed_copy)], [Path(args.checkpoint)], args.overwrite)
    signed = sign_checkpoint(args.checkpoint, args.signed_copy)
    print(f"Signed {signed.path} (SHA-256 {signed.sha256})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from TextSegLib.service.server import serve

    check_service_options(args)
    serve(args.host, args.port, args.token, args.max_request_mb, args.models_dir, args.ready_line,
          args.exit_with_stdin, max_queued=args.max_queued, result_ttl=args.result_ttl,
          read_timeout=args.read_timeout)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    check_service_options(args)
    try:
        from TextSegLib.app.web import serve_web
    except ImportError as error:
        raise UsageError(f"textseg web needs trame-slicer ({error.name} is missing): pip install "
                         "'textseg[web]'.") from None
    serve_web(args.host, args.port, args.server, args.token or environment_token(), args.models_dir)
    return 0


def _files(path: Path) -> list[Path]:
    """A file, or the files of a folder (what an evaluation reads)."""
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def cmd_evaluate(args: argparse.Namespace) -> int:
    from TextSegLib.evaluation import tables as evaluation

    options = segment_options(args)
    if args.model:
        check_models(args.model)
    for given, what in ((args.manifest, "manifest"), (args.prediction, "prediction"), (args.reference, "reference")):
        if given:
            check_readable_file(given, what)
    tables = [(Path(option), render) for option, render in (
        (args.json, evaluation.to_json), (args.csv, evaluation.to_csv), (args.markdown, evaluation.to_markdown))
        if option]
    read = [Path(p) for p in (args.manifest, args.prediction, args.reference, args.lvit) if p and Path(p).exists()]
    if args.manifest and Path(args.manifest).is_file():
        from TextSegLib.io.manifests import read_manifest

        read += [p for case in read_manifest(args.manifest) for p in (case.image, case.label) if p is not None]
    check_outputs([path for path, _ in tables], [f for p in read for f in _files(p)], args.overwrite)
    if args.lvit_size is not None and (not args.lvit or args.lvit_size < 1):
        raise UsageError("--lvit-size goes with --lvit and is a positive number of pixels, e.g. --lvit-size 224.")
    if args.lvit:
        if args.manifest or args.prediction or args.reference:
            raise UsageError("Give --lvit (with --model) alone, without --manifest or a prediction and a reference.")
        if not args.model:
            raise UsageError("--lvit needs --model: the model whose segmentations are evaluated.")
        from TextSegLib.engine.catalogue import Catalogue
        from TextSegLib.engine.run import Segmenter
        from TextSegLib.io.images import lvit_folder

        items = lvit_folder(args.lvit)
        segmenter = Segmenter(args.model, options, Catalogue(args.models_dir))
        size = None if args.lvit_size is None else (args.lvit_size, args.lvit_size)
        rows = evaluation.evaluate_lvit(segmenter, items, progress=lambda name: print(f"Segmenting {name}",
                                                                                        file=sys.stderr), size=size)
        for note in segmenter.notes:
            NOTES.note(note)
    elif args.manifest:
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
            NOTES.note(note)
    else:
        if not (args.prediction and args.reference):
            raise UsageError("Give a prediction and a reference (files or folders), or --manifest or --lvit with "
                             "--model.")
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
    unit = "px" if args.lvit else "mm"  # 2D pictures carry no pixel size
    print(evaluation.to_text(rows, summary, unit))
    with OutputTransaction(overwrite=args.overwrite) as transaction:
        for path, render in tables:
            text = render(rows, summary, unit)
            transaction.add(path, lambda temporary, text=text: Path(temporary).write_text(text, encoding="utf-8"))
    for path in transaction.committed:
        print(f"Wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from TextSegLib.evaluation.demo import demo_case, run_demo

    checked_option("--device", check_device, args.device)
    model = demo_case(args.case)["model"] if args.model is None else args.model
    check_models([model])
    bar = progress_bar(0, "segmenting", args.quiet)

    def report(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        run_demo(Path(args.output), args.device, model, args.case, progress=report)
    finally:
        bar.close()
    return 0
