"""Training precision: the trainer's bf16 autocast (CUDA, and CPUs with native bf16) is exact enough to train in.

The shipped models' losses and gradients on real slices (OpenKBP's pt_247, patient B, MoNuSeg test tiles) are
computed in fp32 and under bf16 autocast as the trainer computes them; the two must agree in the loss and point the
same way in every parameter group that gets a gradient, because an optimizer step is what the gradient decides.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from testkit import MONUSEG

from TextSegLib.engine.devices import cpu_has_native_bf16
from TextSegLib.engine.loading import load_model
from TextSegLib.evaluation.demo import demo_case
from TextSegLib.io.manifests import read_manifest
from TextSegLib.models.registry import get_spec
from Training.data import Lvit2DDataset, SliceDataset, TextTable
from Training.trainer import adamw, amp_dtype, normalise_in_fp32

TILES = MONUSEG / "Test_Folder"


def volume_batch(loaded, case: str, structure: str, tmp_path: Path, size: int = 4) -> list[dict]:
    """``size`` slices spread over the extent of ``structure`` in a bundled demo case, as the trainer reads them."""
    info = demo_case(case)
    target = next(t for t in info["targets"] if t["structure"] == structure)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("case,image,label,text,modality,split,label_value,slice\n"
                        f"{info['case']},{info['image']},{info['label']},{target['prompt']},{info['modality']},,"
                        f"{target['label_value']},\n")
    dataset = SliceDataset(read_manifest(manifest), loaded.preprocessing, slices="lesion")
    step = len(dataset) / size
    return [dataset[int(step * (i + 0.5))] for i in range(size)]


def tile_batch(loaded, size: int = 2) -> list[dict]:
    dataset = Lvit2DDataset(TILES / "img", TILES / "labelcol", TILES / "Test_text.xlsx", loaded.preprocessing,
                            mask_rule="lvit")
    return [dataset[i] for i in range(size)]


def loss_and_gradients(loaded, batch: list[dict], dtype: torch.dtype | None, fp32_norms: bool = True,
                       ) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the gradient of every parameter on ``batch``, under autocast to ``dtype`` (None: fp32) with the
    normalisation layers in fp32 as the trainer has them (``fp32_norms``), on a copy of the loaded network."""
    network = copy.deepcopy(loaded.network).float().train()
    if dtype is not None and fp32_norms:
        assert normalise_in_fp32(network) > 0
    torch.manual_seed(0)  # the same dropout draws in both precisions
    images = torch.stack([b["image"] for b in batch])
    targets = torch.stack([b["target"] for b in batch])
    texts = [b["text"] for b in batch]
    texts = TextTable(loaded.text_encoder, texts).batch(texts, torch.device("cpu"))
    network.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        outputs = network.forward_train(images, texts)
    loss = get_spec(loaded.info.architecture).loss(network.config)(outputs, targets)["loss"]
    loss.backward()
    return float(loss.detach()), {name: p.grad for name, p in network.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model, batch", [
    ("headneck-freqmedclip-small", ("headneck", "left parotid gland")),
    ("abdomen-freqmedclip-small", ("abdomen", "liver")),
    ("monuseg-mmrdl", None),
])
def test_bf16_autocast_gives_the_fp32_loss_and_gradients_of_the_shipped_models_on_real_slices(model, batch,
                                                                                               tmp_path):
    loaded = load_model(model, "cpu")
    slices = volume_batch(loaded, *batch, tmp_path) if batch else tile_batch(loaded)
    assert all(float(s["target"].sum()) > 0 for s in slices)
    loss32, exact = loss_and_gradients(loaded, slices, None)
    loss16, rounded = loss_and_gradients(loaded, slices, torch.bfloat16)
    assert exact.keys() == rounded.keys() and len(exact) > 50
    assert abs(loss16 - loss32) < 0.02 * abs(loss32), (loss32, loss16)
    flat32 = torch.cat([g.flatten() for g in exact.values()])
    flat16 = torch.cat([g.flatten() for g in rounded.values()])
    assert float(torch.nn.functional.cosine_similarity(flat32, flat16, dim=0)) > 0.99
    # block by block (the top-level modules: encoders, fusion, decoders), so that no part of a network is left to
    # noise behind a large agreeing one. The bar lies between rounding and the failure it guards against: with its
    # normalisation layers in bf16, MMRDL's prompt encoder falls to 0.62; rounding alone takes the head-and-neck
    # model's fusion block (the weight average of stages 4 and 5) to 0.971, each member alone to 0.996 (2026-12-06)
    blocks: dict[str, list[str]] = {}
    for name in exact:
        blocks.setdefault(name.split(".")[0], []).append(name)
    for block, names in blocks.items():
        a = torch.cat([exact[n].flatten() for n in names])
        b = torch.cat([rounded[n].flatten() for n in names])
        if float(a.norm()) < 1e-8:
            continue
        assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.95, block


def test_the_trainer_takes_bf16_only_where_the_cpu_computes_it_and_fused_adamw_on_the_cpu():
    assert amp_dtype(torch.device("cpu")) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = adamw([parameter], torch.device("cpu"), lr=0.1)
    assert optimizer.defaults["fused"] is True
    parameter.grad = torch.tensor([1.0, -1.0, 0.0])
    optimizer.step()
    reference = torch.nn.Parameter(torch.ones(3))
    reference.grad = parameter.grad.clone()
    plain = torch.optim.AdamW([reference], lr=0.1, foreach=False)
    plain.step()
    torch.testing.assert_close(parameter.detach(), reference.detach(), rtol=0, atol=1e-7)
