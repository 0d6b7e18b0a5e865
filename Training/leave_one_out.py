"""Leave-one-case-out evaluation: train on all cases but one, segment the held-out case, repeat for every case.

    python Training/leave_one_out.py --config Training/configs/shipped.toml --output runs/loo

Each fold trains in ``<output>/<case>/`` with the config's recipe on the other cases (no validation split, the last
epoch is kept, so the held-out case influences nothing), then segments the held-out volume with its own text
through the inference engine and compares with its label on the original grid. An interrupted fold resumes from its
training state; a finished one is not trained again. Writes ``loo.csv`` and ``loo.md`` (per-case table and means)
to ``<output>``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import clear_model_cache, load_model
from TextSegLib.evaluation import tables as evaluation
from TextSegLib.io.manifests import read_manifest
from Training.config import load_config
from Training.distributed import setup
from Training.trainer import Trainer


def _fold_manifest(source: Path, held_out: str, target: Path) -> Path:
    """The manifest without the held-out case's rows, with absolute paths."""
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            if row.get("case") != held_out:
                for key in ("image", "label", "volume", "mask"):
                    if row.get(key):
                        row[key] = str((source.parent / row[key]).resolve())
                writer.writerow(row)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--cases", help="comma-separated subset of the manifest's cases")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args(argv)
    base = load_config(args.config, args.set)
    manifest = base.resolve(base.data.manifest)
    cases = read_manifest(manifest)
    chosen = args.cases.split(",") if args.cases else [c.case for c in cases]
    output = Path(args.output).resolve()
    context = setup(base.train.device)
    rows = []
    for case in [c for c in cases if c.case in chosen]:
        fold = output / case.case
        overrides = [*args.set, f"data.manifest=\"{_fold_manifest(manifest, case.case, fold / 'manifest.csv')}\"",
                     "data.val_fraction=0.0", "export.select=\"last\""]
        config = load_config(args.config, overrides)
        checkpoint = fold / "model.safetensors"
        resume = (fold / "state" / "train.safetensors").is_file()
        if resume or not checkpoint.is_file():
            print(f"[{case.case}] training on the other {len(cases) - 1} case(s) ...", file=sys.stderr)
            Trainer(config, fold, context).fit(resume=resume)
        clear_model_cache()
        engine = InferenceEngine(load_model(checkpoint, context.device))
        rows += evaluation.evaluate_manifest(engine, [case])
        print(f"[{case.case}] held-out Dice {rows[-1]['dice']:.4f}", file=sys.stderr)
    summary = evaluation.summarise(rows)
    (output / "loo.csv").write_text(evaluation.to_csv(rows, summary))
    (output / "loo.md").write_text(evaluation.to_markdown(rows, summary))
    print(evaluation.to_markdown(rows, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
