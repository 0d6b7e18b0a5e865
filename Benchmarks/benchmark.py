"""Inference benchmark: parameters, GFLOPs per slice and slices per second for each network configuration.

Run ``python Benchmarks/benchmark.py`` (or ``make benchmark``). It prints a Markdown table and, with ``--json``,
writes the figures. Networks get random weights (speed does not depend on them); the text is a random 20-token
prompt, encoded once, as the engine does. The end-to-end row times ``textseg segment`` on the real lung2 CT
in a fresh process (start-up, model load, prompt encoding, 61 slices, writing the .seg.nrrd).

GFLOPs count multiply-adds as two operations, from PyTorch's FLOP counter (convolutions and matrix products;
FFTs, normalisation and element-wise work are not counted).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from TextSegLib.models import create_model, preset_config
from TextSegLib.text import TextFeatures

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"

# (label, architecture, preset, input side, text width)
CONFIGS = {
    "texlivernet-paper": ("texlivernet", "paper", 256, 768),
    "texlivernet-small": ("texlivernet", "small", 256, 384),
}


def random_text(dim: int, batch: int, device: torch.device) -> TextFeatures:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(1, 20, dim, generator=generator).to(device)
    return TextFeatures(tokens, torch.ones(1, 20, dtype=torch.bool, device=device),
                        torch.randn(1, dim, generator=generator).to(device)).expand(batch)


def gflops_per_slice(model: torch.nn.Module, side: int, dim: int, device: torch.device) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, model.config.in_channels, side, side, device=device), random_text(dim, 1, device))
    return counter.get_total_flops() / 1e9


def slices_per_second(model, side: int, dim: int, batch: int, device: torch.device, seconds: float) -> float:
    x = torch.rand(batch, model.config.in_channels, side, side, device=device)
    text = random_text(dim, batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    with torch.inference_mode(), autocast:
        model(x, text)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 2 * batch:
            model(x, text)
            done += batch
            if device.type == "cuda":
                torch.cuda.synchronize()
        return done / (time.perf_counter() - started)


def end_to_end_seconds(preset: str) -> float:
    """Wall time of ``textseg segment`` on lung2 in a fresh process, with a random-weight checkpoint."""
    from TextSegLib.checkpoints import save_checkpoint

    with tempfile.TemporaryDirectory() as folder:
        model = create_model("texlivernet", preset_config("texlivernet", preset, text_dim=384))
        checkpoint = Path(folder) / "model.safetensors"
        save_checkpoint(checkpoint, model, architecture="texlivernet",
                        text_encoder={"source": "minilm", "max_tokens": 128})
        command = [str(Path(sys.executable).parent / "textseg"), "segment", str(DATA / "lung2_image.nrrd"),
                   "-p", "a large soft-tissue mass in the posterior left lower lung", "-m", str(checkpoint),
                   "-o", folder, "-q"]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: " + ", ".join(CONFIGS))
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    for label in args.configs.split(","):
        architecture, preset, side, dim = CONFIGS[label]
        torch.manual_seed(0)
        model = create_model(architecture, preset_config(architecture, preset, text_dim=dim)).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        flops = gflops_per_slice(model, side, dim, device)
        rates = {b: slices_per_second(model, side, dim, b, device, args.seconds) for b in batch_sizes}
        best = max(rates, key=rates.get)
        row = {"config": label, "input": f"{side}x{side}", "device": str(device), "params_m": params / 1e6,
               "gflops_per_slice": flops, "slices_per_s_batch1": rates.get(1),
               "best_batch": best, "slices_per_s_best": rates[best], "rates": rates}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            slices_per_second(model, side, dim, best, device, 0.5)
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        rows.append(row)
        print(f"measured {label}: {rates}", file=sys.stderr)
    cores = torch.get_num_threads()
    print(f"\nDevice: {device} ({cores} CPU threads), torch {torch.__version__}\n")
    print("| network | input | params (M) | GFLOPs/slice | slices/s, batch 1 | slices/s, best batch |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        single = f"{row['slices_per_s_batch1']:.1f}" if row["slices_per_s_batch1"] else "-"
        print(f"| {row['config']} | {row['input']} | {row['params_m']:.2f} | {row['gflops_per_slice']:.1f} | "
              f"{single} | {row['slices_per_s_best']:.1f} (batch {row['best_batch']}) |")
    result = {"device": str(device), "threads": cores, "rows": rows}
    if not args.skip_end_to_end:
        seconds = end_to_end_seconds("small")
        result["end_to_end_lung2_small_s"] = seconds
        print(f"\n`textseg segment` on lung2 (512 x 512 x 61), small TexLiverNet, fresh process: {seconds:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
