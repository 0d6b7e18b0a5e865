"""The training loop: DistributedDataParallel, AMP, gradient accumulation, clipping, exact resume, early stopping,
best-by-validation export to the single-file inference checkpoint, CSV and TensorBoard logs.

The global batch is ``train.batch_size`` whatever the number of processes: each process takes
``batch_size / (processes x accumulation)`` samples per micro-batch, DDP averages the gradients, and BatchNorm
statistics span the global micro-batch (``GlobalBatchNorm2d``), so N processes take the same step as one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from contextlib import nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from TextSegLib import __version__
from TextSegLib.core.messages import first_line
from TextSegLib.engine.checkpoints import load_checkpoint, save_checkpoint
from TextSegLib.engine.devices import cpu_has_native_bf16
from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.evaluation.metrics import dice_from_counts, iou_from_counts
from TextSegLib.io.manifests import read_manifest, split_patients
from TextSegLib.models.registry import create_model, get_spec, preset_config
from TextSegLib.text.features import TextFeatures
from TextSegLib.text.sources import load_text_encoder

from .config import TrainConfig
from .data import Lvit2DDataset, SliceDataset, TextTable, augment, perturb_text
from .distributed import Context, all_gather_objects, convert_batchnorm
from .sampling import BalancedSampler
from .state import load_rng, load_state, save_rng, save_state

__all__ = ["Trainer"]


class _TrainForward(nn.Module):
    """Routes DDP's forward to the network's ``forward_train`` (DDP only synchronises through ``forward``).

    Shapes: image ``(B, C, H, W)``, tokens ``(B, L, D)``, mask ``(B, L)``, pooled ``(B, P)`` -> outputs dict.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, image, tokens, mask, pooled) -> dict[str, torch.Tensor]:
        return self.network.forward_train(image, TextFeatures(tokens, mask, pooled))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type ``train.amp`` trains in on ``device``: bf16 on CUDA (fp16, with loss scaling, where bf16 is
    missing) and on CPUs that compute bf16 natively (AVX512-BF16 or AMX, the engine's rule for inference); None
    (fp32) on other CPUs, where bf16 is emulated and slower. Weights, gradients and the optimizer stay fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


# The normalisation layers that CPU autocast leaves in bf16: CUDA's autocast runs layer and group norm in fp32, the
# CPU's runs them in their input's type (checked on torch 2.15: F.layer_norm, F.group_norm and F.batch_norm of a bf16
# convolution output give bf16 under torch.autocast("cpu", torch.bfloat16)). In bf16 the gradients of their scales and
# shifts, sums over every pixel of terms that nearly cancel, lose their sign: on MoNuSeg tiles MMRDL's Enc_P
# LayerNorms got gradients at cosine -0.4 to 0.8 with fp32's (Testing/training/test_precision.py).
NORMALISATIONS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def _inputs_in_fp32(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def normalise_in_fp32(network: nn.Module) -> int:
    """Make every normalisation layer of ``network`` compute in fp32 under autocast, as CUDA's autocast does for
    layer norms: its input is cast to fp32, so the layer and its backward run in fp32 and the next convolution or
    linear layer casts back to bf16. Returns how many layers were hooked."""
    layers = [m for m in network.modules() if isinstance(m, NORMALISATIONS)]
    for layer in layers:
        layer.register_forward_pre_hook(_inputs_in_fp32)
    return len(layers)


def training_precision(network: nn.Module, device: torch.device, amp: bool = True) -> torch.dtype | None:
    """The autocast type to train ``network`` in on ``device`` (:func:`amp_dtype`; None: fp32, also when ``amp`` is
    false), with its normalisation layers in fp32 where that type is the CPU's bf16 (:func:`normalise_in_fp32`)."""
    dtype = amp_dtype(device) if amp else None
    if dtype is not None and device.type == "cpu":
        normalise_in_fp32(network)
    return dtype


def adamw(parameters: list[nn.Parameter], device: torch.device, **options: Any) -> torch.optim.AdamW:
    """AdamW as the trainer steps it: on the CPU the fused update (one pass over each tensor instead of a dozen
    element-wise ones, the same arithmetic); elsewhere PyTorch's default (foreach on CUDA, as tested there)."""
    return torch.optim.AdamW(parameters, fused=True if device.type == "cpu" else None, **options)


def cosine_schedule(lr: float, min_lr: float, t_max: int, restarts: bool = False):
    """The learning-rate factor of epoch ``e`` (for ``LambdaLR``): a cosine from ``lr`` down to ``min_lr`` over
    ``t_max`` epochs, then flat at ``min_lr``; with ``restarts``, back to ``lr`` every ``t_max`` epochs (SGDR, as
    ``CosineAnnealingWarmRestarts`` with ``T_mult = 1``)."""
    floor = min_lr / lr if lr else 0.0
    period = max(t_max, 1)

    def factor(epoch: int) -> float:
        progress = (epoch % period if restarts else min(epoch, period)) / period
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Trainer:
    """Builds everything a run needs from a :class:`TrainConfig` and runs it in ``output``."""

    def __init__(self, config: TrainConfig, output: Path, context: Context) -> None:
        self.config, self.output, self.context = config, Path(output), context
        self.state_dir = self.output / "state"
        torch.manual_seed(config.train.seed)
        spec = get_spec(config.model.architecture)
        self.spec = spec
        source = config.text.encoder or spec.default_text_encoder
        overrides = dict(config.model.overrides)
        base = preset_config(config.model.architecture, config.model.preset, **overrides)
        max_tokens = config.text.max_tokens or getattr(base, "max_text_tokens", None)
        self.encoder = load_text_encoder(source, device=context.device, max_tokens=max_tokens)
        self.text_encoder_meta = {"source": source, "max_tokens": self.encoder.max_tokens}
        taken = [("text_dim", self.encoder.dim), ("pooled_dim", self.encoder.pooled_dim)]
        if config.text.max_tokens:  # an explicit prompt length: the network must take prompts that long
            taken.append(("max_text_tokens", self.encoder.max_tokens))
            network_tokens = overrides.get("max_text_tokens")
            if network_tokens is not None and network_tokens < self.encoder.max_tokens:
                raise ValueError(f"text.max_tokens keeps prompts of up to {self.encoder.max_tokens} tokens, but "
                                 f"model.overrides.max_text_tokens = {network_tokens} is shorter; raise it or drop it")
        widths = {name: value for name, value in taken if hasattr(base, name) and name not in overrides}
        self.model_config = dataclasses.replace(base, **widths)
        network = create_model(config.model.architecture, self.model_config)
        self.preprocessing_meta = dict(config.data.preprocessing or spec.default_preprocessing)
        self.preprocessing = Preprocessing.from_metadata(self.preprocessing_meta,
                                                         channels=getattr(self.model_config, "in_channels", 1))
        if spec.input_range is not None:
            self.preprocessing.check_range(spec.input_range, spec.title)
        self._build_data()
        self.texts = TextTable(self.encoder, self._all_texts())
        prepare = getattr(network, "prepare_training", None)
        if prepare is not None:
            prepare(lambda text: self.encoder.encode([text]))
        if config.model.init:
            self._warm_start(network, config.resolve(config.model.init))
        if context.distributed:
            network = convert_batchnorm(network)
        self.network = network.to(context.device)
        wrapped = _TrainForward(self.network)
        self.forward = DistributedDataParallel(wrapped) if context.distributed else wrapped
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        optim = config.optim
        self.optimizer = adamw(trainable, context.device, lr=optim.lr, betas=tuple(optim.betas),
                               weight_decay=optim.weight_decay)
        t_max = optim.t_max or config.train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(optim.lr, optim.min_lr, t_max, optim.restarts))
        self.amp_dtype = training_precision(self.network, context.device, config.train.amp)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = spec.loss(self.model_config)
        self.generator = torch.Generator().manual_seed(config.train.seed * 1000 + context.rank)

    def _warm_start(self, network: nn.Module, path: Path) -> None:
        """Load the weights of an earlier run's checkpoint ``path`` into ``network`` (``model.init``): the same
        architecture, config and text encoder; the optimizer, the schedule and the epochs start afresh."""
        architecture = self.config.model.architecture
        earlier, info = load_checkpoint(path, expected_architecture=architecture)
        if info.text_encoder.get("source") != self.text_encoder_meta.get("source"):
            raise ValueError(f"model.init {str(path)!r} was trained with the text encoder "
                             f"{info.text_encoder.get('source')!r}, this run uses "
                             f"{self.text_encoder_meta.get('source')!r}; start from a checkpoint made with the same "
                             "text encoder.")
        try:
            network.load_state_dict(earlier.state_dict())
        except RuntimeError as error:
            raise ValueError(f"model.init {str(path)!r} holds a {architecture} of another size or config than this "
                             f"run's ({first_line(error)}); give both runs the same model section.") from None

    # ------------------------------------------------------------------ data

    def _build_data(self) -> None:
        data, train = self.config.data, self.config.train
        if data.manifest:
            cases = read_manifest(self.config.resolve(data.manifest))
            train_cases, val_cases, test_cases = split_patients(cases, data.val_fraction, data.test_fraction,
                                                                data.split_seed, data.stratify or None)
            self.train_set = SliceDataset(train_cases, self.preprocessing, data.orientation, data.slices,
                                          data.empty_fraction, seed=data.split_seed, min_content=data.min_content)
            self.test_cases = [c.case for c in test_cases]
            self.val_set = SliceDataset(val_cases, self.preprocessing, data.orientation, "all") if val_cases \
                else None
            self.train_cases, self.val_cases = [c.case for c in train_cases], [c.case for c in val_cases]
        elif data.lvit_images:
            full = Lvit2DDataset(self.config.resolve(data.lvit_images), self.config.resolve(data.lvit_masks),
                                 self.config.resolve(data.lvit_texts), self.preprocessing, data.lvit_mask_name,
                                 mask_rule=data.lvit_mask_rule)
            patients = sorted({row[3] for row in full.rows})
            if data.lvit_val_images:
                held = Lvit2DDataset(self.config.resolve(data.lvit_val_images),
                                     self.config.resolve(data.lvit_val_masks or data.lvit_masks),
                                     self.config.resolve(data.lvit_val_texts), self.preprocessing, data.lvit_mask_name,
                                     mask_rule=data.lvit_mask_rule)
                val_patients = sorted({row[3] for row in held.rows})
                shared = set(patients) & set(val_patients)
                if shared:
                    raise ValueError(f"data.lvit_val_images shares patients with data.lvit_images "
                                     f"({sorted(shared)[0]}...); validation must hold other patients.")
                self.train_set = Subset(full, list(range(len(full))))
                self.val_set = Subset(held, list(range(len(held))))
                self.train_cases, self.val_cases = patients, val_patients
            else:
                generator = torch.Generator().manual_seed(data.split_seed)
                order = [patients[i] for i in torch.randperm(len(patients), generator=generator).tolist()]
                held_out = set(order[: round(data.val_fraction * len(order))])
                self.train_set = Subset(full, [i for i, r in enumerate(full.rows) if r[3] not in held_out])
                self.val_set = Subset(full, [i for i, r in enumerate(full.rows) if r[3] in held_out]) \
                    if held_out else None
                self.train_cases, self.val_cases = sorted(set(patients) - held_out), sorted(held_out)
            self.test_cases = []
        else:
            raise ValueError("The config names no data: set data.manifest or data.lvit_images.")
        if len(self.train_set) == 0:
            raise ValueError("The training split holds no slice; check the manifest and data.slices.")
        processes = self.context.world_size * train.accumulation
        if train.batch_size % processes:
            raise ValueError(f"train.batch_size ({train.batch_size}) must be divisible by processes x accumulation "
                             f"({self.context.world_size} x {train.accumulation})")
        self.micro_batch = train.batch_size // processes
        if data.sampling == "balanced":
            if not isinstance(self.train_set, SliceDataset):
                raise ValueError("data.sampling = \"balanced\" needs a manifest (data.manifest).")
            self.sampler = BalancedSampler([item.has_lesion for item in self.train_set.items],
                                           self.context.world_size, self.context.rank, seed=train.seed,
                                           samples=data.samples_per_epoch)
        elif data.sampling == "uniform" and data.samples_per_epoch:  # one group: a uniform draw of that many
            self.sampler = BalancedSampler([True] * len(self.train_set), self.context.world_size,
                                           self.context.rank, seed=train.seed, samples=data.samples_per_epoch)
        elif data.sampling == "uniform":
            self.sampler = DistributedSampler(self.train_set, num_replicas=self.context.world_size,
                                              rank=self.context.rank, shuffle=True, seed=train.seed)
        else:
            raise ValueError(f"data.sampling must be \"uniform\" or \"balanced\", got {data.sampling!r}")
        self.loader = DataLoader(self.train_set, batch_size=self.micro_batch, sampler=self.sampler,
                                 num_workers=train.num_workers, pin_memory=self.context.device.type == "cuda")

    def _all_texts(self) -> list[str]:
        texts = []
        for dataset in (self.train_set, self.val_set):
            if dataset is None:
                continue
            if isinstance(dataset, Subset):
                texts += [dataset.dataset.rows[i][2] for i in dataset.indices]
            else:
                texts += [item.text for item in dataset.items]
        return texts

    # --------------------------------------------------------------- running

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.context.device.type, dtype=self.amp_dtype)

    def _outputs(self, images: torch.Tensor, texts: list[str]) -> dict[str, torch.Tensor]:
        text = self.texts.batch(texts, self.context.device)
        if self.network.training:
            text = perturb_text(text, self.generator, self.config.augment.text_noise)
        return self.forward(images, text.tokens, text.mask, text.pooled)

    def train_epoch(self, epoch: int, steps_done: int) -> tuple[dict[str, float], int]:
        """One pass over the training split; returns averaged losses, throughput and the optimizer step count."""
        train = self.config.train
        self.network.train()
        self.sampler.set_epoch(epoch)
        totals: dict[str, float] = {}
        samples, started = 0, time.perf_counter()
        batches = len(self.loader)
        progress = None
        if self.context.is_main:
            from tqdm import tqdm

            progress = tqdm(total=batches, desc=f"epoch {epoch + 1}", unit="batch", leave=False, disable=None)
        self.optimizer.zero_grad(set_to_none=True)
        for index, batch in enumerate(self.loader):
            last_micro = (index + 1) % train.accumulation == 0 or index + 1 == batches
            images = batch["image"].to(self.context.device, non_blocking=True)
            targets = batch["target"].to(self.context.device, non_blocking=True)
            images, targets = augment(images, targets, self.generator, self.config.augment.scale,
                                      self.config.augment.rotate_degrees, self.config.augment.intensity_shift)
            sync = nullcontext() if last_micro or not self.context.distributed else self.forward.no_sync()
            with sync:
                with self._autocast():
                    outputs = self._outputs(images, list(batch["text"]))
                losses = self.loss_fn(outputs, targets)
                self.scaler.scale(losses["loss"] / train.accumulation).backward()
            loss = float(losses["loss"].detach())
            if not math.isfinite(loss):
                raise FloatingPointError(
                    f"The training loss became {loss} at epoch {epoch + 1}, batch "
                    f"{index + 1}: the weights have diverged and every later step would be wasted. Lower optim.lr "
                    f"(now {self.optimizer.param_groups[0]['lr']:g}) or raise train.batch_size; the best "
                    "checkpoint so far is kept in the run folder.")
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + float(value.detach()) * images.shape[0]
            samples += images.shape[0]
            if last_micro:
                if train.clip_grad_norm:
                    self.scaler.unscale_(self.optimizer)
                    torch.nn.utils.clip_grad_norm_(self.network.parameters(), train.clip_grad_norm)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                steps_done += 1
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{float(losses['loss'].detach()):.4f}")
            if train.max_steps is not None and steps_done >= train.max_steps:
                break
        if progress is not None:
            progress.close()
        seconds = time.perf_counter() - started
        gathered = all_gather_objects((totals, samples), self.context)
        count = sum(n for _, n in gathered)
        metrics = {f"train_{k}": sum(t.get(k, 0.0) for t, _ in gathered) / max(count, 1) for k in totals}
        metrics["train_slices_per_s"] = count / seconds if seconds > 0 else 0.0
        return metrics, steps_done

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Dice and IoU per (case, target) over all its slices at the network's resolution, the means of those,
        Dice Global and the validation loss; cases are shared out between processes."""
        if self.val_set is None:
            return {}
        self.network.eval()
        groups: dict[tuple[str, Any], list[int]] = {}
        dataset = self.val_set
        if isinstance(dataset, Subset):
            for position, index in enumerate(dataset.indices):
                groups.setdefault((dataset.dataset.rows[index][3], None), []).append(position)
        else:
            for index, item in enumerate(dataset.items):
                groups.setdefault((dataset.cases[item.case].case, item.label_value), []).append(index)
        keys = sorted(groups, key=str)[self.context.rank :: self.context.world_size]
        results = []
        for key in keys:
            overlap = predicted = reference = loss = 0.0
            indices = groups[key]
            for start in range(0, len(indices), 2 * self.micro_batch):
                batch = [dataset[i] for i in indices[start : start + 2 * self.micro_batch]]
                images = torch.stack([b["image"] for b in batch]).to(self.context.device)
                targets = torch.stack([b["target"] for b in batch]).to(self.context.device)
                with self._autocast():
                    outputs = self.network.forward_train(images, self.texts.batch([b["text"] for b in batch],
                                                                                  self.context.device))
                loss += float(self.loss_fn(outputs, targets)["loss"]) * len(batch)
                mask = (outputs["logits"].float() > 0).float()
                overlap += float((mask * targets).sum())
                predicted += float(mask.sum())
                reference += float(targets.sum())
            results.append((key, overlap, predicted, reference, loss, len(indices)))
        everything = [r for part in all_gather_objects(results, self.context) for r in part]
        dices = [dice_from_counts(o, p, r) for _, o, p, r, _, _ in everything]
        ious = [iou_from_counts(o, p, r) for _, o, p, r, _, _ in everything]
        return {
            "val_loss": sum(r[4] for r in everything) / max(sum(r[5] for r in everything), 1),
            "val_dice": sum(dices) / max(len(dices), 1),
            "val_iou": sum(ious) / max(len(ious), 1),
            "val_dice_global": dice_from_counts(*(sum(r[i] for r in everything) for i in (1, 2, 3))),
        }

    # ------------------------------------------------------------- lifecycle

    def export(self, summary: dict[str, Any]) -> Path:
        """Write the inference checkpoint ``model.safetensors`` (rank 0)."""
        export = self.config.export
        path = self.output / "model.safetensors"
        save_checkpoint(path, self.network, architecture=self.config.model.architecture,
                        text_encoder=self.text_encoder_meta, preprocessing=self.preprocessing_meta,
                        orientation=self.config.data.orientation, threshold=export.threshold,
                        components=export.components,
                        name=export.name, description=export.description, example_prompts=export.example_prompts,
                        training=summary)
        return path

    def _log(self, row: dict[str, Any], writer) -> None:
        path = self.output / "log.csv"
        new = not path.exists()
        with open(path, "a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                out.writeheader()
            out.writerow(row)
        if writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, row["epoch"])
            writer.flush()

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train for ``train.epochs`` (or until early stopping / ``max_steps``); returns the run summary."""
        config, context = self.config, self.context
        progress: dict[str, Any] = {"epoch": 0, "steps": 0, "best_dice": -1.0, "best_epoch": None,
                                    "stale": 0, "history": [], "seconds": 0.0}
        if resume:
            progress = load_state(self.state_dir, self.network, self.optimizer, self.scheduler, self.scaler)
            load_rng(self.state_dir, context.rank, self.generator)
            if progress.get("processes") != context.world_size:
                raise ValueError(f"The run was made with {progress.get('processes')} processes; resume with the "
                                 "same number.")
        elif context.is_main:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            (self.output / "config.json").write_text(json.dumps(config.to_dict(), indent=2, default=str))
            (self.output / "log.csv").unlink(missing_ok=True)
        if context.distributed:
            torch.distributed.barrier()  # the output folder exists for every process
        writer = None
        if context.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                writer = SummaryWriter(str(self.output / "tensorboard"))
            except ImportError:
                writer = None
        patience = config.train.early_stop_patience
        for epoch in range(progress["epoch"], config.train.epochs):
            if config.train.max_steps is not None and progress["steps"] >= config.train.max_steps:
                break  # a resumed run that had already finished
            started = time.perf_counter()
            train_metrics, progress["steps"] = self.train_epoch(epoch, progress["steps"])
            self.scheduler.step()
            val_metrics = self.validate()
            progress["seconds"] += time.perf_counter() - started
            row = {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"], **train_metrics, **val_metrics,
                   "seconds": round(time.perf_counter() - started, 3)}
            progress["history"].append(row)
            improved = bool(val_metrics) and val_metrics["val_dice"] > progress["best_dice"]
            if improved:
                progress["best_dice"], progress["best_epoch"], progress["stale"] = val_metrics["val_dice"], epoch + 1, 0
            else:
                progress["stale"] += 1
            progress["epoch"] = epoch + 1
            progress["processes"] = context.world_size
            stop_steps = config.train.max_steps is not None and progress["steps"] >= config.train.max_steps
            if context.is_main:
                self._log(row, writer)
                save_state(self.state_dir, self.network, self.optimizer, self.scheduler, self.scaler, progress)
                if improved or config.export.select == "last" or not val_metrics:
                    self.export(self._summary(progress, row))
            save_rng(self.state_dir, context.rank, self.generator)
            if context.distributed:
                torch.distributed.barrier()
            if stop_steps or (patience is not None and val_metrics and progress["stale"] >= patience):
                break
        if writer is not None:
            writer.close()
        return progress

    def _summary(self, progress: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
        return {
            "architecture": self.config.model.architecture,
            "preset": self.config.model.preset,
            "train_cases": self.train_cases,
            "val_cases": self.val_cases,
            "test_cases": self.test_cases,
            "epoch": row["epoch"],
            "best_epoch": progress["best_epoch"],
            "val_dice": row.get("val_dice"),
            "val_iou": row.get("val_iou"),
            "val_dice_global": row.get("val_dice_global"),
            "train_loss": row.get("train_loss"),
            "global_batch": self.config.train.batch_size,
            "processes": self.context.world_size,
            "device": self.context.device.type,
            "precision": str(self.amp_dtype or torch.float32).removeprefix("torch."),
            "seconds": round(progress["seconds"], 1),
            "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "textseg_version": __version__,
            "config": self.config.to_dict(),
        }
