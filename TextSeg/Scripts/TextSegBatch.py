"""Segment image files with TextSeg in headless 3D Slicer: the options of ``textseg segment``, nothing more.

    Slicer --no-main-window --python-script TextSegBatch.py -- lung2_image.nrrd \\
        -p "a large soft-tissue mass in the posterior left lower lung" -m my-model -o lung2.seg.nrrd

Everything after ``--`` is what ``textseg segment`` takes (inputs, ``-p/--prompt``, ``-m/--model``, ``-o/--output``,
``--name``, ``--probability``, ``--device``, ``--batch-size``, ``--threshold``, ``--modality``, ``-q``); the
command line is handed to ``TextSegLib.cli`` unchanged, so the two never differ. Models are looked up in the same
catalogue (``$TEXTSEG_MODELS_DIR`` chooses the folder of imported models). Missing Python packages are installed
first without asking (batch mode; torch through the PyTorch extension). Slicer exits with the command's exit code:
0 on success, 1 for bad input (one line on stderr, nothing written), 2 for a malformed command line.

In an Extension Manager install the script lies in the ``Scripts`` folder beside the module::

    os.path.join(os.path.dirname(slicer.modules.textseg.path), "Scripts", "TextSegBatch.py")
"""

import logging
import sys

import slicer


def segmentFiles(arguments: list[str]) -> int:
    """Install missing dependencies, then run ``textseg segment`` with ``arguments``; return the exit code."""
    from TextSeg import TextSegLogic

    TextSegLogic().ensureDependencies(askConfirmation=False)
    from TextSegLib.app.cli import main

    return main(["segment", *arguments])


def exitCode(arguments: list[str]) -> int:
    """Exit code of the run; argparse's own exits (``--help``, a malformed command line) are passed on."""
    try:
        return segmentFiles(arguments)
    except SystemExit as request:
        return request.code if isinstance(request.code, int) else (0 if request.code is None else 1)
    except RuntimeError as error:  # an unsupported Slicer, dependencies that could not be installed
        from TextSegLib.core.messages import first_line

        print(f"TextSegBatch: error: {first_line(error)}", file=sys.stderr)
        return 1
    except Exception:
        logging.exception("TextSeg batch segmentation failed")
        return 1


commandLine = sys.argv[1:]
if commandLine[:1] == ["--"]:
    commandLine = commandLine[1:]
slicer.util.exit(exitCode(commandLine))
