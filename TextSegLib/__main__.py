"""``python -m TextSegLib``: the ``textseg`` command (what 3D Slicer's worker process and tests run)."""

from TextSegLib.app.cli import run

run()
