"""TextSeg benchmark: every network at its paper resolution, on the CPU or the GPU, in one run.

    python Benchmarks/benchmark.py [--device cpu|cuda] [--json figures.json]        (or: make benchmark)

For each network (paper and small presets) it prints parameters (total and trainable), GFLOPs per slice, and
slices per second and peak memory for

  (a) a naive loop: one slice at a time, fp32, the prompt re-encoded for every slice, and
  (b) the engine as users get it (``InferenceEngine`` with its defaults),

with the ratio b/a and the best batch size; then training throughput (forward, backward and AdamW step, as the
trainer takes it: in bf16 autocast where ``train.amp`` gives bf16, and again in fp32 for comparison), and the
end-to-end time of ``textseg segment`` (a fresh process: start-up, model and text encoder loading, reading,
segmenting, writing) on the real lung2 CT and on a 512 x 512 x 300 CT made from it, plus the engine's time on that
volume once the model is loaded. On CUDA it adds the measured bf16 matrix rate and the achieved TFLOP/s of each
network, and compares the optimised path (bf16, channels-last) with fp32 on lung2 with the demo checkpoint.

Networks get random weights (speed does not depend on them) and the packaged MiniLM text encoder. FreqMedCLIP's
ViT is BiomedCLIP's ViT-B/16 architecture built locally with random weights (no download). GFLOPs count a
multiply-add as two operations (PyTorch's FLOP counter: convolutions and matrix products; FFTs, normalisation and
element-wise work are not counted). Peak memory is the GPU's allocator peak on CUDA; on the CPU it is the growth of
the peak resident memory of a fresh process over one run (after building the network), because in a long-lived
process freed memory is reused and later runs would read as nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from TextSegLib.engine.checkpoints import CheckpointInfo
from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import LoadedModel, load_model
from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.evaluation.demo import DEMO_DIR, DEMO_MODEL
from TextSegLib.evaluation.metrics import dice
from TextSegLib.io.volumes import CanonicalTransform, Volume, read_volume, write_image
from TextSegLib.models.registry import create_model, get_spec, preset_config
from TextSegLib.text.features import TextFeatures
from TextSegLib.text.sources import load_text_encoder

if __package__ in (None, ""):  # run as a script: the trainer's package lies beside this folder
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from Training.trainer import adamw, amp_dtype, training_precision

LUNG2 = DEMO_DIR / "lung2_image.nrrd"  # the real lung2 CT, packaged with TextSeg for the demo
PROMPT = "a large soft-tissue mass in the posterior left lower lung"
NETWORKS = ("texlivernet-paper", "texlivernet-small", "mmrdl-paper", "mmrdl-small", "freqmedclip-paper",
            "freqmedclip-small")
BIOMEDCLIP_VISION = {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                     "timm_proj": "linear", "image_size": 224}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory during a ``with`` block: CUDA allocator peak, or growth of the process's peak RSS (Linux)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0

    @staticmethod
    def _rss_peak() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set size
            self.start = self._rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.bytes = self._rss_peak() - self.start


def cpu_memory_in_fresh_process(label: str, what: str, slices: int) -> float:
    """MB of peak resident memory growth of one run of ``what`` (``naive`` or ``engine:<batch>``) of ``label`` in
    a new process: see :func:`memory_probe`."""
    command = [sys.executable, __file__, "--memory-probe", f"{label}:{what}", "--slices", str(slices)]
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"memory probe failed: {finished.stderr.strip()[-2000:]}")
    return float(finished.stdout.split()[-1]) / 2**20


def memory_probe(spec: str, slices: int) -> None:
    """Build ``label`` on the CPU, then print the growth of the peak resident memory over one naive loop or one
    engine run with the given batch size (``label:naive`` or ``label:engine:<batch>``)."""
    label, what, *batch = spec.split(":")
    with tempfile.TemporaryDirectory() as scratch:
        loaded = build(label, torch.device("cpu"), Path(scratch))
        slab = throughput_volume(read_volume(LUNG2), slices)
        loaded.text_encoder.encode_cached(PROMPT)
        with PeakMemory(torch.device("cpu")) as memory:
            if what == "naive":
                naive_loop(loaded, slab)
            else:
                InferenceEngine(loaded, batch_size=int(batch[0])).segment(slab, PROMPT)
    print(memory.bytes)


def vision_folder(root: Path) -> Path:
    """BiomedCLIP's image-tower architecture as an open_clip local folder, without weights (random init)."""
    folder = root / "biomedclip-vit-b16"
    folder.mkdir(exist_ok=True)
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}
    config = {"model_cfg": {"embed_dim": 512, "vision_cfg": BIOMEDCLIP_VISION, "text_cfg": text}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def build(label: str, device: torch.device, scratch: Path) -> LoadedModel:
    """A random-weight network of ``label`` with the MiniLM encoder, as the engine loads checkpoints."""
    architecture, preset = label.rsplit("-", 1)
    encoder = load_text_encoder("minilm", device=device)
    overrides: dict = {"text_dim": encoder.dim}
    base = preset_config(architecture, preset)
    if hasattr(base, "pooled_dim"):
        overrides["pooled_dim"] = encoder.pooled_dim
    if architecture == "freqmedclip":
        overrides["vision_source"] = f"local-dir:{vision_folder(scratch)}"
    config = preset_config(architecture, preset, **overrides)
    torch.manual_seed(0)
    network = create_model(architecture, config).to(device).eval()
    spec = get_spec(architecture)
    info = CheckpointInfo(architecture=architecture, config={}, text_encoder={"source": "minilm"},
                          preprocessing=dict(spec.default_preprocessing), name=label)
    preprocessing = Preprocessing.from_metadata(spec.default_preprocessing,
                                                channels=getattr(config, "in_channels", 1))
    return LoadedModel(network, info, encoder, preprocessing, device)


def gflops(loaded: LoadedModel) -> float:
    size = loaded.preprocessing.size
    image = torch.zeros(1, loaded.preprocessing.channels, *size, device=loaded.device)
    text = loaded.text_encoder.encode([PROMPT])
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        loaded.network(image, text)
    return counter.get_total_flops() / 1e9


def naive_loop(loaded: LoadedModel, volume: Volume) -> float:
    """Slices per second of the naive loop (see the module docstring)."""
    device = loaded.device
    canonical = CanonicalTransform.create(volume.direction, "LPS").forward(volume.array)
    mapping = loaded.preprocessing.intensity_for("CT").mapping(canonical)
    _synchronize(device)
    started = time.perf_counter()
    for index in range(canonical.shape[0]):
        text = loaded.text_encoder.encode([PROMPT])  # no cache: re-encoded for every slice
        raw = torch.from_numpy(np.ascontiguousarray(canonical[index], dtype=np.float32))[None].to(device)
        with torch.no_grad():
            x = loaded.preprocessing.prepare(raw, mapping)
            logits = loaded.network(x, text)
            probability = torch.sigmoid(F.interpolate(logits, size=canonical.shape[1:], mode="bilinear"))
        probability.cpu()
    _synchronize(device)
    return canonical.shape[0] / (time.perf_counter() - started)


def engine_rate(loaded: LoadedModel, volume: Volume, batch_size: int | None, compile: bool = False) -> float:
    """Slices per second of the engine once warm: the prompt cached, cuDNN autotuned, compiled, and on the CPU the
    batch size timed (a short volume may need a few runs for that, as in an interactive session)."""
    engine = InferenceEngine(loaded, batch_size=batch_size, compile=compile)
    for _ in range(4):
        engine.segment(volume, PROMPT)
        if loaded.device.type == "cuda" or engine.chosen_batch_size(loaded) is not None:
            break
    _synchronize(loaded.device)
    started = time.perf_counter()
    engine.segment(volume, PROMPT)
    _synchronize(loaded.device)
    return volume.array.shape[0] / (time.perf_counter() - started)


def training_rate(loaded: LoadedModel, batch: int, seconds: float, amp: bool = True) -> float:
    """Slices per second of forward, loss, backward and AdamW step on random slices, in the trainer's precision
    (``Training.trainer.training_precision``: bf16 on CUDA and on CPUs with native bf16, there with the
    normalisation layers in fp32; fp32 with ``amp=False``) and with its optimizer (``Training.trainer.adamw``)."""
    device = loaded.device
    network = loaded.network
    network.train()
    loss_fn = get_spec(loaded.info.architecture).loss(network.config)
    optimizer = adamw([p for p in network.parameters() if p.requires_grad], device, lr=1e-4)
    dtype = training_precision(network, device, amp)
    images = torch.rand(batch, loaded.preprocessing.channels, *loaded.preprocessing.size, device=device)
    targets = (torch.rand(batch, 1, *loaded.preprocessing.size, device=device) > 0.9).float()
    text = loaded.text_encoder.encode([PROMPT]).expand(batch)
    text = TextFeatures(text.tokens.contiguous(), text.mask.contiguous(), text.pooled.contiguous())
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    done, started = -1, 0.0
    while done < 0 or time.perf_counter() - started < seconds or done < 2 * batch:
        with autocast:
            losses = loss_fn(network.forward_train(images, text), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        _synchronize(device)
        if done < 0:  # the first step is a warm-up
            done, started = 0, time.perf_counter()
        else:
            done += batch
    network.eval()
    return done / (time.perf_counter() - started)


def bf16_matrix_rate(device: torch.device) -> float:
    """Measured bf16 matrix-multiply TFLOP/s (8192 x 8192 products)."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize(device)
    return 20 * 2 * 8192**3 / (time.perf_counter() - started) / 1e12


def stage(label: str, what: str, measure, *args) -> float:
    """``measure(*args)``, with its figure and how long it took logged to stderr, so a long run shows progress."""
    started = time.perf_counter()
    value = measure(*args)
    print(f"{label}: {what} {value:.2f} (measured in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    return value


def end_to_end(path: Path, model: str, device: torch.device, out: Path) -> float:
    command = [str(Path(sys.executable).parent / "textseg"), "segment", str(path), "-p", PROMPT, "-m", model,
               "-o", str(out), "-q", "--device", device.type]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True)
    if finished.returncode:
        raise RuntimeError(f"textseg segment failed ({finished.returncode}): {finished.stderr.strip()[-2000:]}")
    return time.perf_counter() - started


def resampled(lung2: Volume, depth: int) -> Volume:
    """lung2 resampled (linear) along its slices to ``depth`` slices: for 300, a 512 x 512 x 300 CT of real
    anatomy with 1.02 mm slices."""
    import SimpleITK as sitk

    image = lung2.to_sitk()
    spacing = (image.GetSpacing()[0], image.GetSpacing()[1], image.GetSpacing()[2] * image.GetDepth() / depth)
    return Volume.from_sitk(sitk.Resample(image, (image.GetWidth(), image.GetHeight(), depth), sitk.Transform(),
                                          sitk.sitkLinear, image.GetOrigin(), spacing, image.GetDirection(),
                                          -1024.0, sitk.sitkInt16))


def large_volume(lung2: Volume, folder: Path) -> Path:
    """The 512 x 512 x 300 CT of :func:`resampled`, written as an uncompressed NRRD."""
    volume = resampled(lung2, 300)
    path = folder / "lung2_300.nrrd"
    write_image(path, volume.array, volume, compress=False)
    return path


def throughput_volume(lung2: Volume, slices: int) -> Volume:
    """The middle ``slices`` slices of lung2, or lung2 resampled to ``slices`` when it has fewer."""
    depth = lung2.array.shape[0]
    if slices > depth:
        return resampled(lung2, slices)
    middle = depth // 2
    return Volume.from_sitk(lung2.to_sitk()[:, :, middle - slices // 2 : middle + (slices + 1) // 2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--networks", default=",".join(NETWORKS), help="comma-separated: " + ", ".join(NETWORKS))
    parser.add_argument("--slices", type=int, help="slices for the throughput measurements (default: 16 of "
                        "lung2 on the CPU, 300 on CUDA: lung2 resampled)")
    parser.add_argument("--batch-sizes", help="engine batch sizes to sweep (default: 1,2,4,8 on the CPU, "
                        "8,32,128 on CUDA)")
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window for training throughput")
    parser.add_argument("--compile", action="store_true", help="also time the engine with torch.compile")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-end-to-end", action="store_true")
    parser.add_argument("--model", default=DEMO_MODEL, help="checkpoint for the end-to-end rows")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)  # internal: one CPU memory figure
    args = parser.parse_args()
    if args.memory_probe:
        memory_probe(args.memory_probe, args.slices)
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    cuda = device.type == "cuda"
    lung2 = read_volume(LUNG2)
    slab = throughput_volume(lung2, args.slices or (300 if cuda else 16))
    figures: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                     f"CPU, {torch.get_num_threads()} threads", "torch": torch.__version__, "networks": {}}
    if device.type == "cuda":
        figures["bf16_matrix_tflops"] = bf16_matrix_rate(device)
    figures["training_precision"] = str(amp_dtype(device) or torch.float32).removeprefix("torch.")
    batch_sizes = [int(b) for b in (args.batch_sizes or ("8,32,128" if cuda else "1,2,4,8")).split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        for label in args.networks.split(","):
            loaded = build(label, device, Path(scratch))
            row = {"params_m": sum(p.numel() for p in loaded.network.parameters()) / 1e6,
                   "trainable_m": sum(p.numel() for p in loaded.network.parameters() if p.requires_grad) / 1e6,
                   "gflops": gflops(loaded)}
            with PeakMemory(device) as memory:  # on the CPU replaced below by a fresh process's figure
                row["naive"] = stage(label, "naive slices/s", naive_loop, loaded, slab)
            row["naive_memory_mb"] = memory.bytes / 2**20
            with PeakMemory(device) as memory:
                row["engine"] = stage(label, "engine slices/s", engine_rate, loaded, slab, None)
            row["engine_memory_mb"] = memory.bytes / 2**20
            row["engine_batch"] = InferenceEngine(loaded).chosen_batch_size(loaded)  # timed on the CPU
            if not cuda:
                row["naive_memory_mb"] = cpu_memory_in_fresh_process(label, "naive", slab.array.shape[0])
                row["engine_memory_mb"] = cpu_memory_in_fresh_process(label, f"engine:{row['engine_batch']}",
                                                                      slab.array.shape[0])
            row["ratio"] = row["engine"] / row["naive"]
            row["sweep"] = {b: stage(label, f"batch {b} slices/s", engine_rate, loaded, slab, b)
                            for b in batch_sizes}
            if args.compile:
                row["engine_compiled"] = stage(label, "compiled slices/s", engine_rate, loaded, slab, None, True)
            if not args.skip_training:
                training_batch = 16 if device.type == "cuda" else 4
                row["training"] = stage(label, "training slices/s", training_rate, loaded, training_batch,
                                        args.seconds)
                if amp_dtype(device) is not None:
                    row["training_fp32"] = stage(label, "training slices/s fp32", training_rate, loaded,
                                                 training_batch, args.seconds, False)
            if device.type == "cuda":
                row["tflops"] = row["gflops"] * max(row["engine"], *row["sweep"].values()) / 1e3
            figures["networks"][label] = row
            del loaded
        if not args.skip_end_to_end:
            out = Path(scratch) / "out"
            model = load_model(args.model, device)
            figures["end_to_end_lung2_s"] = stage("textseg segment", "lung2 s", end_to_end, LUNG2, args.model,
                                                  device, out)
            large = large_volume(lung2, Path(scratch))
            figures["end_to_end_512x512x300_s"] = stage("textseg segment", "512 x 512 x 300 s", end_to_end,
                                                        large, args.model, device, out)
            volume = read_volume(large)
            engine = InferenceEngine(model)
            engine.segment(volume, PROMPT)
            _synchronize(device)
            started = time.perf_counter()
            with PeakMemory(torch.device("cpu")) as host, PeakMemory(device) as memory:
                engine.segment(volume, PROMPT)
            _synchronize(device)
            figures["engine_512x512x300_s"] = time.perf_counter() - started
            figures["engine_512x512x300_memory_mb"] = memory.bytes / 2**20
            figures["engine_512x512x300_host_mb"] = host.bytes / 2**20
            figures["input_512x512x300_mb"] = volume.array.nbytes / 2**20
            if device.type == "cuda":
                fp32 = InferenceEngine(model, amp=False).segment(lung2, PROMPT, probability=True)
                fast = InferenceEngine(model).segment(lung2, PROMPT, probability=True)
                figures["optimised_vs_fp32"] = {
                    "dice": dice(fast.mask, fp32.mask),
                    "max_probability_difference": float(np.abs(fp32.probability - fast.probability).max()),
                }
    report(figures, batch_sizes)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


def report(figures: dict, batch_sizes: list[int]) -> None:
    print(f"\nDevice: {figures['device']}, torch {figures['torch']}\n")
    gpu = "bf16_matrix_tflops" in figures
    header = ("| network | params (M), trainable | GFLOPs/slice | naive slices/s | engine slices/s (batch) | "
              "engine/naive | "
              + " | ".join(f"batch {b}" for b in batch_sizes) + " | peak memory naive / engine (MB) |")
    rows = figures["networks"].values()
    extra = (" training slices/s |" if any("training" in r for r in rows) else "")
    extra += (f" training slices/s in fp32 ({figures['training_precision']} above) |"
              if any("training_fp32" in r for r in rows) else "")
    extra += " TFLOP/s |" if gpu else ""
    print(header + extra)
    print("|---" * (header.count("|") - 1 + extra.count("|")) + "|")
    for label, row in figures["networks"].items():
        cells = [label, f"{row['params_m']:.2f}, {row['trainable_m']:.2f}", f"{row['gflops']:.1f}",
                 f"{row['naive']:.2f}", f"{row['engine']:.2f} ({row.get('engine_batch') or 'auto'})",
                 f"{row['ratio']:.2f}",
                 *[f"{row['sweep'][b]:.2f}" for b in batch_sizes],
                 f"{row['naive_memory_mb']:.0f} / {row['engine_memory_mb']:.0f}"]
        if "training" in row:
            cells.append(f"{row['training']:.2f}")
        if "training_fp32" in row:
            cells.append(f"{row['training_fp32']:.2f}")
        if gpu:
            cells.append(f"{row['tflops']:.1f}")
        print("| " + " | ".join(cells) + " |")
    if "engine_compiled" in next(iter(figures["networks"].values()), {}):
        print("\nWith torch.compile: " + ", ".join(f"{k} {r['engine_compiled']:.2f} slices/s"
                                                    for k, r in figures["networks"].items()))
    if gpu:
        print(f"\nMeasured bf16 matrix rate: {figures['bf16_matrix_tflops']:.0f} TFLOP/s")
    if "end_to_end_lung2_s" in figures:
        print(f"\n`textseg segment`, fresh process: lung2 (512 x 512 x 61) {figures['end_to_end_lung2_s']:.1f} s, "
              f"512 x 512 x 300 {figures['end_to_end_512x512x300_s']:.1f} s; engine on 512 x 512 x 300 once "
              f"loaded {figures['engine_512x512x300_s']:.2f} s, peak memory "
              f"{figures['engine_512x512x300_memory_mb']:.0f} MB, host memory growth "
              f"{figures['engine_512x512x300_host_mb']:.0f} MB (input {figures['input_512x512x300_mb']:.0f} MB)")
    if "optimised_vs_fp32" in figures:
        check = figures["optimised_vs_fp32"]
        print(f"Optimised path vs fp32 on lung2: mask Dice {check['dice']:.4f}, largest probability difference "
              f"{check['max_probability_difference']:.4f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
