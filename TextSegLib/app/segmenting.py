"""``textseg segment``: every input and output checked first, the model loaded once for all inputs and prompts (in
this process through :class:`~TextSegLib.engine.run.Segmenter`, or on a worker with ``--server``), and all outputs
written or none.
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
from collections.abc import Sequence
from pathlib import Path

from TextSegLib.app.commands import NOTES, check_models, check_outputs, progress_bar, segment_options
from TextSegLib.core.errors import UsageError
from TextSegLib.core.files import OutputTransaction
from TextSegLib.core.options import SegmentOptions, check_text
from TextSegLib.core.settings import (
    DEBUG_PAUSE_VARIABLE,
    debug_pause,
    environment_token,
)
from TextSegLib.io.images import is_image_2d
from TextSegLib.io.volumes import case_name

log = logging.getLogger("textseg")


def _stage(stage: str, what: str) -> None:
    """Log a stage of ``segment`` (shown with --debug) and pause there when ``TEXTSEG_DEBUG_PAUSE`` names it."""
    log.info("%s %s", stage, what)
    if debug_pause() == stage:
        print(f"textseg: debug: paused at {stage} {what} ({DEBUG_PAUSE_VARIABLE})", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        try:  # SIGUSR1 ends the pause; SIGINT and SIGTERM still end the run
            signal.sigtimedwait({signal.SIGUSR1}, 60)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].lower() or "segment"


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
    """The segments' names: the ``--name`` given for each prompt, or the prompts; each name once (a prompt given
    twice would give two identical segments)."""
    if names:
        if len(names) != len(prompts):
            raise UsageError(f"Give one --name per --prompt ({len(prompts)} prompts, {len(names)} names).")
        for name in names:
            check_text(name, "--name", UsageError)
        names = [" ".join(name.split()) for name in names]
        if not all(names):
            raise UsageError("A --name is empty; give each segment a name or leave --name out.")
    chosen = names or prompts
    for number, name in enumerate(chosen):
        if name in chosen[:number]:
            what = "--name" if names else "--prompt"
            raise UsageError(f"The {what} {name[:40]!r} is given {chosen.count(name)} times; each segment needs its "
                             f"own {what[2:]} (repeat -p only for different structures).")
    return chosen


def _segmenter(args: argparse.Namespace, options: SegmentOptions):
    """``(segment(volume, prompt, progress) -> result, description)``: in this process, or on ``--server``; both
    choose the device and fall back to the CPU the same way (:class:`~TextSegLib.engine.run.Segmenter`)."""
    if args.server:
        if options.compile:
            raise UsageError("--compile applies to a run in this process; a worker (--server) decides it itself.")
        from TextSegLib.service.client import RemoteWorker
        from TextSegLib.service.protocol import SegmentRequest, WorkerError

        worker = RemoteWorker(args.server, args.token or environment_token())
        worker.health()

        def remote(volume, prompt: str, progress):
            request = SegmentRequest(prompt, list(args.model), options)
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


def _mask_paths(inputs: Sequence[Path], output: Path | None, names: list[str]) -> list[list[Path]]:
    """Per 2D picture, one mask PNG per prompt: ``<name>.mask.png`` for one prompt, ``<name>.<n>-<prompt>.mask.png``
    for several; ``--output x.png`` names the one mask of one picture and one prompt."""
    if output is not None and output.suffix.lower() == ".png":
        if len(inputs) != 1 or len(names) != 1:
            raise UsageError(f"--output {str(output)!r} names one mask: give one picture and one prompt, or a folder.")
        return [[output]]
    folder = output or Path.cwd()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output {str(folder)!r} is a file; for pictures give a .png file or a folder.")
    if output is not None and output.suffix and not output.exists():
        raise UsageError(f"--output {str(output)!r}: for pictures give a .png file (one picture, one prompt) or a "
                         "folder.")
    paths = [[folder / (f"{path.stem}.mask.png" if len(names) == 1 else
                        f"{path.stem}.{number}-{_slug(name)}.mask.png") for number, name in enumerate(names, start=1)]
             for path in inputs]
    flat = [p for per_input in paths for p in per_input]
    duplicates = {p for p in flat if flat.count(p) > 1}
    if duplicates:
        raise UsageError(f"Several inputs would write {sorted(map(str, duplicates))[0]}; give distinct file names.")
    return paths


def _segment_pictures(args: argparse.Namespace, inputs: list[Path], prompts: list[str], names: list[str],
                      options: SegmentOptions) -> int:
    """``textseg segment`` of 2D pictures: each read as grey or RGB, one mask PNG per prompt on its own grid."""
    from TextSegLib.io.images import read_image_2d, write_mask_2d

    if args.server:
        raise UsageError("--server segments volumes; segment 2D pictures in this process (leave --server out).")
    if args.probability:
        raise UsageError("--probability is written for volumes only; leave it out for 2D pictures.")
    outputs = _mask_paths(inputs, Path(args.output) if args.output else None, names)
    models_given = [Path(m) for m in args.model if Path(m).exists()]
    every_output = [p for per_input in outputs for p in per_input]
    check_outputs(every_output, [*inputs, *models_given], args.overwrite)
    existing = {path for path in every_output if path.exists()}
    images = [read_image_2d(path) for path in inputs]
    from TextSegLib.engine.catalogue import Catalogue
    from TextSegLib.engine.run import Segmenter

    segmenter = Segmenter(args.model, options, Catalogue(args.models_dir))
    print(f"Model {segmenter.describe()}", flush=True)
    args.outputs_started = True
    with OutputTransaction() as transaction:
        for source, image, targets in zip(inputs, images, outputs, strict=True):
            for prompt, name, target in zip(prompts, names, targets, strict=True):
                result = segmenter.segment_image(image, prompt)
                for note in result.notes:
                    NOTES.note(note)
                channels = "RGB" if image.shape[0] == 3 else "grey"
                print(f"{source.stem}: {name!r}: {result.voxel_count} pixels of {image.shape[1]} x {image.shape[2]} "
                      f"({channels}) in {result.seconds:.1f} s", flush=True)
                transaction.add(target, lambda temporary, m=result.mask[0]: write_mask_2d(temporary, m))
    for path in transaction.committed:
        print(f"Wrote {path}" + (" (replaced the earlier file)" if path in existing else ""))
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from TextSegLib.core.options import validate_prompt
    from TextSegLib.io.segnrrd import segment_for_result, write_seg_nrrd
    from TextSegLib.io.volumes import check_volume_file, read_volume, write_image

    options = segment_options(args)
    prompts = [validate_prompt(p) for p in args.prompt]
    names = _segment_names(prompts, args.name)
    check_models(args.model)
    inputs = [Path(p) for p in args.inputs]
    pictures = [is_image_2d(path) for path in inputs]
    if all(pictures):
        return _segment_pictures(args, inputs, prompts, names, options)
    if any(pictures):
        raise UsageError("Give either volumes or 2D pictures (PNG, TIFF, JPEG, BMP) in one run, not both.")
    for path in inputs:
        check_volume_file(path)
    outputs = _output_paths(inputs, Path(args.output) if args.output else None)
    probability_paths = [[_probability_path(target, number, name) for number, name in enumerate(names, start=1)]
                         if args.probability else [] for target in outputs]
    models_given = [Path(m) for m in args.model if Path(m).exists()]
    every_output = [*outputs, *(p for paths in probability_paths for p in paths)]
    check_outputs(every_output, [*inputs, *models_given], args.overwrite)
    existing = {path for path in every_output if path.exists()}

    segment, where = _segmenter(args, options)
    print(f"Model {where}", flush=True)

    args.outputs_started = True
    with OutputTransaction(overwrite=args.overwrite) as transaction:
        for source, target, probability_targets in zip(inputs, outputs, probability_paths, strict=True):
            _stage("reading", str(source))
            volume = read_volume(source, modality=args.modality)
            segments, probabilities = [], []
            for index, (prompt, name) in enumerate(zip(prompts, names, strict=True)):
                label = f"{case_name(source)}: {name}"
                bar = progress_bar(0, f"{case_name(source)}: {name[:30]}", args.quiet)
                try:
                    result = segment(volume, prompt, _reporter(bar, label))
                finally:
                    bar.close()
                assert result is not None  # nothing cancels a command-line run
                for note in result.notes:  # a device note holds for every result: said once
                    NOTES.note(note)
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
