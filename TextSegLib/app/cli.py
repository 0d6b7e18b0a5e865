"""The ``textseg`` command: list models, segment volumes from text prompts, evaluate segmentations, sign checkpoints.

This module holds the parser, the error reporting and the signals; :mod:`TextSegLib.app.segmenting` and
:mod:`TextSegLib.app.commands` what each subcommand does.

Errors caused by the input (a missing file, an empty prompt, a damaged checkpoint, an output that cannot be
written, ...) raise a :class:`~TextSegLib.core.errors.TextSegError`, reported in one line on stderr with the exit
code 1 (2 for a command line argparse cannot parse). Any other exception is a fault in TextSeg or a library under
it: one line names it as unexpected and asks for a report, also with the exit code 1. ``--debug`` shows the full
traceback of either instead. Ctrl-C (SIGINT) and SIGTERM end a run with one line and the exit codes 130 and 143.

``segment`` and ``evaluate`` write all their outputs or none: everything is checked first (inputs, prompts,
options, that no output is an input, that no output exists unless ``--overwrite`` is given, that each output's
folder is writable), then every output is written to a hidden temporary file beside its target, and the targets
are put in place only when every input has been segmented and every file written; without ``--overwrite`` they
are put in place in a way that never replaces a file, so a file another run wrote meanwhile is kept and this run
says so. A failure or an interrupt at any point removes the temporary files, so a failed run leaves no file behind;
inputs are only ever read.

``TEXTSEG_DEBUG_PAUSE=reading|segmenting|writing`` is a debugging and testing aid: ``segment`` stops for up to
60 s when it starts reading an input, after the first batch of slices of a prompt, or when an input's outputs are
written to their temporary files but not yet put in place, and says so on stdout (the tests send signals there;
SIGUSR1 ends the pause).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

from TextSegLib import __version__
from TextSegLib.app.commands import NOTES, cmd_demo, cmd_evaluate, cmd_import, cmd_models, cmd_serve, cmd_sign, cmd_web
from TextSegLib.app.segmenting import cmd_segment
from TextSegLib.core import threads
from TextSegLib.core.errors import TextSegError
from TextSegLib.core.messages import describe_fault, first_line
from TextSegLib.core.options import COMPONENTS, MODALITIES
from TextSegLib.core.settings import (
    DEFAULT_HOST,
    DEFAULT_MAX_QUEUED,
    DEFAULT_MAX_REQUEST_MB,
    DEFAULT_READ_TIMEOUT,
    DEFAULT_RESULT_TTL,
    MODELS_DIR_VARIABLE,
    SERVE_PORT,
    THREADS_VARIABLE,
    TOKEN_VARIABLE,
    WEB_PORT,
)

log = logging.getLogger("textseg")

class _Terminated(BaseException):
    """SIGTERM, raised where the program is when it arrives (like KeyboardInterrupt for SIGINT)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one line (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _setup_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("textseg: %(levelname)s: %(message)s"))
    NOTES.messages.clear()
    handler.addFilter(NOTES)
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


# ---------------------------------------------------------------------------------------------------- models


# --------------------------------------------------------------------------------------------------- segment


# ------------------------------------------------------------------------------------------------------ sign


# ----------------------------------------------------------------------------------------------------- serve


# ------------------------------------------------------------------------------------------------------- web


# -------------------------------------------------------------------------------------------------- evaluate


# ------------------------------------------------------------------------------------------------------ demo


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

    segment = sub.add_parser("segment", help="segment volumes or 2D pictures from text prompts, one segment per "
                             "prompt")
    segment.add_argument("inputs", nargs="+", help="volume files (NRRD, NIfTI, MHA) or DICOM series folders, or 2D "
                         "pictures (PNG, TIFF, JPEG, BMP; grey or RGB), each written as a mask PNG per prompt")
    segment.add_argument("-p", "--prompt", action="append", required=True,
                         help="what to segment; repeat for several segments")
    segment.add_argument("-m", "--model", action="append", required=True,
                         help="catalogue id or checkpoint file; repeat to average an ensemble")
    segment.add_argument("-o", "--output", help="a .seg.nrrd file (one input), a .png file (one picture, one "
                         "prompt) or a folder (default: current folder)")
    segment.add_argument("--name", action="append", help="segment name per prompt (default: the prompt)")
    segment.add_argument("--probability", action="store_true", help="also write each probability volume")
    segment.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    segment.add_argument("--batch-size", type=int, help="slices per forward pass (default: chosen for the device)")
    segment.add_argument("--threshold", type=float, help="probability threshold (default: the model's, 0.5)")
    segment.add_argument("--modality", choices=MODALITIES, help="override the guess from the intensities")
    segment.add_argument("--components", choices=COMPONENTS, help="all: keep every part of each mask; largest: only "
                         "its largest connected part (default: the model's, shown by `textseg models`)")
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
    serve.add_argument("--max-queued", type=int, default=DEFAULT_MAX_QUEUED, help="jobs waiting at most; more are "
                       f"refused with 503 and Retry-After (default {DEFAULT_MAX_QUEUED})")
    serve.add_argument("--result-ttl", type=float, default=DEFAULT_RESULT_TTL, help="seconds a finished job's result "
                       f"is kept for its client to fetch (default {DEFAULT_RESULT_TTL:g})")
    serve.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT, help="seconds a request's "
                       f"headers may take, and its body besides 1 s per MB (default {DEFAULT_READ_TIMEOUT:g})")
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
                              "dataset manifest or LViT-layout folder segmented by a model)")
    evaluate.add_argument("prediction", nargs="?", help=".seg.nrrd or label image, or a folder of them")
    evaluate.add_argument("reference", nargs="?", help=".seg.nrrd or label image, or a folder matched by case name")
    evaluate.add_argument("--segment", help="segment name in a prediction .seg.nrrd (default: the first)")
    evaluate.add_argument("--reference-segment", help="segment name in a reference .seg.nrrd (default: the first)")
    evaluate.add_argument("--manifest", help="a dataset manifest (CSV/JSONL): segment its cases with --model")
    evaluate.add_argument("--lvit", help="an LViT-layout folder (img/, labelcol/, a text table; e.g. MoNuSeg's "
                          "Test_Folder): segment each picture with its own sentence with --model")
    evaluate.add_argument("--lvit-size", type=int, metavar="N", help="with --lvit: score at N x N as LViT's test "
                          "script and MMRDL's paper do (each picture shrunk to N x N before it is segmented, its mask "
                          "by LViT's rule: every pixel a structure touches); default: at each picture's own size")
    evaluate.add_argument("-m", "--model", action="append", help="with --manifest or --lvit: catalogue id or "
                          "checkpoint (repeat for an ensemble)")
    evaluate.add_argument("--split", choices=["train", "val"], help="with --manifest: only this split (as "
                          "training made it: --val-fraction, --split-seed)")
    evaluate.add_argument("--val-fraction", type=float, default=0.2)
    evaluate.add_argument("--split-seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--batch-size", type=int)
    evaluate.add_argument("--fp32", action="store_true", help="with --manifest or --lvit: compute in fp32 (default: "
                          "bf16/fp16 where the GPU or CPU has it, whose masks can differ near the threshold)")
    evaluate.add_argument("--json", help="write the table as JSON (inf as null)")
    evaluate.add_argument("--csv", help="write the table as CSV")
    evaluate.add_argument("--markdown", help="write the table as Markdown")
    evaluate.add_argument("--overwrite", action="store_true", help="replace table files that exist (default: "
                          "refuse to start)")
    evaluate.set_defaults(func=cmd_evaluate)

    from TextSegLib.evaluation.demo import CASE_DIRS, DEFAULT_CASE

    demo = sub.add_parser("demo", help="segment a bundled real CT by name with the shipped model and score it")
    demo.add_argument("-o", "--output", default="textseg-demo", help="folder for the .seg.nrrd and the PNG")
    demo.add_argument("--case", default=DEFAULT_CASE, choices=sorted(CASE_DIRS),
                      help="abdomen (default: patient B, held out, twelve structures by name), headneck (OpenKBP "
                           "test patient pt_247, seven organs at risk) or lung2 (a lesion)")
    demo.add_argument("-m", "--model", help="catalogue id or checkpoint (default: the case's own model: "
                                            "abdomen-freqmedclip-small, or headneck-freqmedclip-small for headneck)")
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

    for computing in (segment, serve, evaluate, demo):
        computing.add_argument("--threads", type=int, help=f"CPU threads to compute with (default: "
                               f"${THREADS_VARIABLE}, $OMP_NUM_THREADS, else the CPUs this process may use, cgroup "
                               "limits included)")
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
        if "threads" in args:  # before anything imports torch
            threads.configure(args.threads)
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


def run(argv: Sequence[str] | None = None) -> None:
    """The ``textseg`` command's entry point: :func:`main`, then :func:`end_process` with its exit code."""
    end_process(main(argv))


def end_process(code: int) -> None:
    """End the process with ``code`` once a command has ended, without tearing the interpreter down where nothing
    can be lost by it.

    When no other Python thread runs (no server's job or sweeper), every output is in place and every file
    closed; what a normal exit would add is the interpreter freeing torch's modules and objects, 1.5 s of a 10 s
    ``textseg segment`` on an idle two-core machine and 5 to 8 s on a busy one, all of it waiting without a
    result (issue 25). So the standard streams and logging are flushed and the process ends at once; with other
    threads alive it exits normally, which waits for them.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if threading.active_count() == 1:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
