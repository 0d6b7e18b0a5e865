"""What a fresh ``textseg`` process pays before it computes: commands that compute nothing never import torch, and
the commands that compute size torch's thread pools by the documented policy (:mod:`TextSegLib.core.threads`), in
real fresh interpreters."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import SimpleITK as sitk
from testkit import REPO

from TextSegLib.service.local import LocalWorker

PROMPT = "a large soft-tissue mass in the posterior left lower lung"

# Runs each command line of argv[1] (a JSON list) in this one fresh interpreter, in order, and prints for each its
# exit code, whether torch was imported by then, and its stderr's last line.
_COMMANDS = r"""
import contextlib, io, json, sys
from TextSegLib.app.cli import main
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as stop:
            code = stop.code
    lines = err.getvalue().strip().splitlines()
    print(json.dumps([code, "torch" in sys.modules, lines[-1] if lines else ""]))
"""


def fresh(code: str, *args: str, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, **environment}, timeout=120)


def test_help_and_argument_errors_never_import_torch(tmp_path):
    """Importing torch costs 2 to 3 s: asking for help or giving a wrong command line must not pay it."""
    missing = str(tmp_path / "missing.nrrd")
    commands = [
        ["--help"],
        ["models", "--help"],
        ["segment", "--help"],
        ["segment", missing],  # argparse: -p and -m missing
        ["segment", missing, "-p", "x", "-m", "y", "--threads", "0"],
        ["segment", missing, "-p", "x", "-m", "y", "--threads", "2"],  # the input is missing
        ["evaluate", "--help"],
        ["serve", "--help"],
    ]
    done = fresh(_COMMANDS, json.dumps(commands))
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [code for code, _, _ in results] == [0, 0, 0, 2, 1, 1, 0, 0]
    assert [imported for _, imported, _ in results] == [False] * len(commands)
    assert results[4][2] == "textseg: error: --threads must be a whole number of at least 1, not 0."
    assert results[5][2].startswith("textseg: error: File not found")


def test_textseg_threads_that_is_no_number_is_one_line_before_anything_is_loaded(tmp_path):
    done = fresh(_COMMANDS, json.dumps([["segment", str(tmp_path / "x.nrrd"), "-p", "x", "-m", "y"]]),
                 TEXTSEG_THREADS="all")
    code, imported, line = json.loads(done.stdout)
    assert (code, imported) == (1, False)
    assert line.startswith("textseg: error: $TEXTSEG_THREADS must be a whole number of at least 1, not 'all'")


def test_a_segment_run_computes_with_the_threads_chosen_and_sleeping_waiters(tmp_path, data_dir, small_checkpoint):
    """``$TEXTSEG_THREADS`` wins over ``$OMP_NUM_THREADS``; torch's pools are sized before the network runs, and
    OpenMP's waiting threads sleep (the order of the other sources is the unit tests' of the policy)."""
    slab = tmp_path / "slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))[:, :, 28:32], str(slab), True)
    code = ("import json, os, sys, torch\nfrom TextSegLib.app.cli import main\n"
            "code = main(sys.argv[1:])\n"
            "print(json.dumps([code, torch.get_num_threads(), torch.get_num_interop_threads(),"
            " os.environ.get('OMP_WAIT_POLICY'), os.environ.get('KMP_BLOCKTIME')]))")
    output = tmp_path / "a.seg.nrrd"
    done = fresh(code, "segment", str(slab), "-p", PROMPT, "-m", str(small_checkpoint), "-q", "--batch-size", "4",
                 "-o", str(output), TEXTSEG_THREADS="2", OMP_NUM_THREADS="1")
    assert json.loads(done.stdout.splitlines()[-1]) == [0, 2, 1, "PASSIVE", "0"], done.stderr
    assert output.is_file()


@pytest.mark.parametrize(("user", "expected"), [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")])
def test_the_local_worker_s_threads_sleep_when_they_wait(monkeypatch, user, expected):
    """3D Slicer's worker is started with passive OpenMP waiting in its environment, unless the user set it."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("KMP_BLOCKTIME", raising=False)
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    environment = LocalWorker()._environment()
    assert environment["OMP_WAIT_POLICY"] == expected and environment["KMP_BLOCKTIME"] == "0"
