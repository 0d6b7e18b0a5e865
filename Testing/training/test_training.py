"""Training on the real cases: DDP with gloo, global batch semantics, exact resume, patient-level splits, export."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from testkit import CASES as PYRADIOMICS_CASES
from testkit import CONFIGS, SHORT, write_manifest

from TextSegLib.engine.inference import InferenceEngine
from TextSegLib.engine.loading import load_model
from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.io.manifests import ManifestError, read_manifest, split_cases
from TextSegLib.io.volumes import CanonicalTransform, read_volume
from TextSegLib.models.registry import get_spec
from Training.config import load_config
from Training.data import SliceDataset
from Training.distributed import Context
from Training.trainer import Trainer, amp_dtype

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "Training" / "train.py"

# The paper recipe of every network that has landed, with the overrides that make one CPU epoch short.
PAPER_CONFIGS = {name: CONFIGS / f"{name}.toml" for name in ("texlivernet", "mmrdl", "freqmedclip")}


def offline(architecture: str, request) -> list[str]:
    """Overrides replacing hub downloads by local stand-ins (FreqMedCLIP's ViT: a tiny seeded open_clip ViT)."""
    if architecture == "freqmedclip":
        return [f"model.overrides={{vision_source=\"local-dir:{request.getfixturevalue('vit_folder')}\"}}"]
    return []


def run_training(args: list[str], processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, str(TRAIN), *args], capture_output=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def read_log(folder: Path) -> list[dict[str, str]]:
    with open(folder / "log.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_paper_configs_hold_the_papers_recipes():
    config = load_config(CONFIGS / "texlivernet.toml")
    assert config.model.architecture == "texlivernet" and config.model.preset == "paper"
    assert (config.optim.lr, config.optim.min_lr, config.optim.weight_decay) == (3e-4, 1e-4, 1e-4)
    assert config.train.batch_size == 32 and config.train.epochs == 200
    assert config.data.preprocessing["intensity"]["CT"] == {"kind": "window", "low": -200.0, "high": 200.0}
    assert config.data.preprocessing["size"] == [256, 256] and config.augment.scale == (0.8, 1.2)
    assert get_spec("texlivernet").loss is not None
    mmrdl = load_config(CONFIGS / "mmrdl.toml")
    assert (mmrdl.optim.lr, mmrdl.train.batch_size, mmrdl.train.early_stop_patience) == (1e-3, 24, 50)
    assert mmrdl.text.encoder.startswith("open_clip:")
    freq = load_config(CONFIGS / "freqmedclip.toml")
    assert (freq.optim.lr, freq.optim.t_max, freq.train.epochs, freq.train.early_stop_patience) == (1e-4, 100, 100, 10)
    assert (freq.train.batch_size, freq.train.accumulation) == (32, 2)  # 4 per GPU x 4 GPUs x accumulation 2
    shipped = load_config(CONFIGS / "shipped.toml")
    assert shipped.text.encoder == "minilm" and shipped.model.preset == "small"
    assert shipped.data.preprocessing["size"] == [128, 128] and shipped.train.epochs == 12


def test_config_overrides_and_errors():
    config = load_config(CONFIGS / "texlivernet.toml", ["train.epochs=3", "model.overrides={dropout=0.0}",
                                                        "export.name=liver"])
    assert config.train.epochs == 3 and config.model.overrides == {"dropout": 0.0} and config.export.name == "liver"
    with pytest.raises(ValueError, match=r"^\[train\] has unknown keys: epoch \(known: .*epochs"):
        load_config(CONFIGS / "texlivernet.toml", ["train.epoch=3"])
    with pytest.raises(ValueError, match=r"^unknown config sections: trian \(known: augment, data, export, model"):
        load_config(CONFIGS / "texlivernet.toml", ["trian.epochs=3"])
    betas = load_config(CONFIGS / "texlivernet.toml", ["optim.betas=[0.8, 0.9]", 'export.example_prompts=["a"]'])
    assert betas.optim.betas == (0.8, 0.9) and betas.export.example_prompts == ["a"]  # tuples where declared
    with pytest.raises(ValueError, match=r"section\.key=value"):
        load_config(CONFIGS / "texlivernet.toml", ["epochs=3"])


def test_no_slice_of_a_validation_patient_is_trained_on(tmp_path, data_dir, annotations):
    """Several patients, several rows per patient (per-lesion and per-slice texts): the split is by patient."""
    extra = "".join(f"{case},{data_dir / annotations[case]['image']},{data_dir / annotations[case]['label']},"
                    f"lesion one of {case},{annotations[case]['modality']},,1,\n" for case in ("brain2", "breast1"))
    extra += f"brain2,{data_dir / 'brain2_image.nrrd'},{data_dir / 'brain2_label.nrrd'},slice text,MR,,1,12\n"
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["lung1", "lung2", "brain1", "brain2", "breast1"],
                              annotations, extra)
    cases = read_manifest(manifest)
    assert [c.case for c in cases] == ["lung1", "lung2", "brain1", "brain2", "breast1"]
    assert len(cases[3].targets) == 3 and cases[3].slice_texts() == {(1, 12): "slice text"}
    train, val = split_cases(cases, 0.2, seed=3)
    assert len(val) == 1 and not {c.case for c in train} & {c.case for c in val}
    assert split_cases(cases, 0.2, seed=3)[1][0].case == val[0].case  # seeded
    preprocessing = Preprocessing.from_metadata(get_spec("texlivernet").default_preprocessing)
    train_set = SliceDataset(train, preprocessing, slices="all", empty_fraction=0.3)
    val_set = SliceDataset(val, preprocessing, slices="all")
    train_patients = {train_set.cases[item.case].case for item in train_set.items}
    val_patients = {val_set.cases[item.case].case for item in val_set.items}
    assert train_patients == {c.case for c in train} and val_patients == {val[0].case}
    assert not train_patients & val_patients
    assert sum(1 for item in val_set.items if item.label_value is None) == read_volume(val[0].image).array.shape[0]


def test_explicit_splits_and_manifest_errors(tmp_path, data_dir, annotations):
    manifest = tmp_path / "m.csv"
    manifest.write_text("case,image,label,text,split\n"
                        f"a,{data_dir / 'brain1_image.nrrd'},{data_dir / 'brain1_label.nrrd'},x,val\n"
                        f"b,{data_dir / 'brain2_image.nrrd'},{data_dir / 'brain2_label.nrrd'},y,train\n")
    train, val = split_cases(read_manifest(manifest), 0.5)
    assert [c.case for c in train] == ["b"] and [c.case for c in val] == ["a"]
    manifest.write_text("case,image,label,text\n"
                        f"a,{data_dir / 'brain1_image.nrrd'},{data_dir / 'brain1_label.nrrd'},\n")
    with pytest.raises(ManifestError, match="no text"):
        read_manifest(manifest)
    manifest.write_text("case,image,label,text,split\n"
                        f"a,{data_dir / 'brain1_image.nrrd'},{data_dir / 'brain1_label.nrrd'},x,holdout\n")
    with pytest.raises(ManifestError, match="split must be"):
        read_manifest(manifest)
    manifest.write_text("case,image,label,text,modality\n"
                        f"a,{data_dir / 'brain1_image.nrrd'},{data_dir / 'brain1_label.nrrd'},x,mr\n"
                        f"b,{data_dir / 'brain2_image.nrrd'},{data_dir / 'brain2_label.nrrd'},y,\n")
    assert [c.modality for c in read_manifest(manifest)] == ["MR", None]
    manifest.write_text("case,image,label,text,modality\n"
                        f"a,{data_dir / 'brain1_image.nrrd'},{data_dir / 'brain1_label.nrrd'},x,PET\n")
    with pytest.raises(ManifestError, match=r"^m\.csv, row 2: The modality must be 'CT', 'MR' .*not 'PET'"):
        read_manifest(manifest)


def test_training_slices_are_prepared_exactly_like_inference(tmp_path, data_dir, annotations, lung2):
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["lung2"], annotations)
    preprocessing = Preprocessing.from_metadata(get_spec("texlivernet").default_preprocessing)
    dataset = SliceDataset(read_manifest(manifest), preprocessing, slices="lesion")
    item = dataset[len(dataset) // 2]
    # What the engine feeds the network for that slice:
    canonical = CanonicalTransform.create(lung2.direction, "LPS").forward(lung2.array)
    mapping = preprocessing.intensity_for("CT").mapping(canonical)
    expected = preprocessing.prepare(torch.from_numpy(np.ascontiguousarray(canonical[item["slice"]],
                                                                           dtype=np.float32))[None], mapping)[0]
    assert torch.equal(item["image"], expected)
    assert item["image"].shape == (1, 256, 256) and item["target"].shape == (1, 256, 256)
    assert item["target"].sum() > 0 and set(item["target"].unique().tolist()) <= {0.0, 1.0}
    assert item["text"] == annotations["lung2"]["prompt"]


def short_config(tmp_path, data_dir, annotations, cases, *extra):
    manifest = write_manifest(tmp_path / "manifest.csv", data_dir, cases, annotations)
    return ["--config", str(CONFIGS / "texlivernet.toml"), "--set", f"data.manifest=\"{manifest}\"",
            *[arg for pair in (("--set", s) for s in [*SHORT, *extra]) for arg in pair]]


@pytest.mark.parametrize("architecture", sorted(PAPER_CONFIGS))
def test_loss_goes_down_on_a_fixed_batch(architecture, tmp_path, data_dir, annotations, request):
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain1", "breast1"], annotations)
    # FreqMedCLIP's MR inputs lie in [0, 1] (its ViT's range), not z-scored: its first steps need a larger rate
    lr = "optim.lr=3e-3" if architecture == "freqmedclip" else "optim.lr=1e-3"
    config = load_config(PAPER_CONFIGS[architecture], [f"data.manifest=\"{manifest}\"", *SHORT, "data.val_fraction=0",
                                                       lr, *offline(architecture, request)])
    trainer = Trainer(config, tmp_path / "run", Context(0, 1, 0, torch.device("cpu")))
    batch = next(iter(trainer.loader))
    images, targets, texts = batch["image"], batch["target"], list(batch["text"])
    losses = []
    trainer.network.train()
    for _ in range(6):
        loss = trainer.loss_fn(trainer.network.forward_train(images, trainer.texts.batch(texts, torch.device("cpu"))),
                               targets)["loss"]
        trainer.optimizer.zero_grad()
        loss.backward()
        trainer.optimizer.step()
        losses.append(float(loss.detach()))
    decreasing = sum(later < earlier for earlier, later in pairwise(losses))
    assert losses[-1] < 0.97 * losses[0] and decreasing >= len(losses) - 2, losses


@pytest.mark.parametrize("architecture", sorted(PAPER_CONFIGS))
def test_one_short_epoch_with_two_gloo_processes_exports_a_usable_checkpoint(architecture, tmp_path, data_dir,
                                                                             annotations, lung2, request):
    out = tmp_path / "run"
    args = short_config(tmp_path, data_dir, annotations, ["brain2", "breast1", "brain1"], "data.val_fraction=0.34",
                        *offline(architecture, request))
    args[1] = str(PAPER_CONFIGS[architecture])
    done = run_training([*args, "--output", str(out)], processes=2)
    assert "Trained 1 epoch(s)" in done.stdout
    (row,) = read_log(out)
    assert float(row["val_dice"]) >= 0.0 and float(row["train_slices_per_s"]) > 0
    assert {p.name for p in (out / "state").iterdir()} == {"train.safetensors", "rng-0.safetensors",
                                                           "rng-1.safetensors"}
    model = load_model(out / "model.safetensors", "cpu")
    assert model.info.architecture == architecture and model.info.training["processes"] == 2
    assert model.info.training["precision"] == ("bfloat16" if amp_dtype(torch.device("cpu")) else "float32")
    assert model.info.training["val_cases"] and model.info.text_encoder["source"] == "minilm"
    slab = lung2.with_array(lung2.array)
    slab.array = lung2.array[28:31]
    result = InferenceEngine(model).segment(slab, annotations["lung2"]["prompt"])
    assert result.mask.shape == (3, 512, 512)
    from TextSegLib.app.cli import main

    assert main(["segment", str(data_dir / "breast1_image.nrrd"), "-p", "a small enhancing mass in the right breast",
                 "-m", str(out / "model.safetensors"), "-o", str(tmp_path / "seg"), "-q"]) == 0
    assert (tmp_path / "seg" / "breast1_image.seg.nrrd").is_file()


def test_two_processes_take_the_same_step_as_one_with_the_whole_batch(tmp_path, data_dir, annotations):
    """Global batch 4: two processes with 2 slices each take the step of one process with all 4 (BatchNorm
    statistics span the global batch).

    Adam's first step moves each weight by about the learning rate whatever the gradient's size, so the weights
    alone would not tell a summed gradient from an averaged one; the first moments (0.1 x the gradient) do. The
    tolerances leave room for float32 reduction order only: per-process BatchNorm differs by about 65 percent in
    the gradients and by 1e-2 in the weights. So both run in fp32 (``train.amp = false``): under bf16 autocast,
    which the trainer uses on CPUs with native bf16, the rounding of 2- and 4-slice products alone moves some
    first moments by 5 percent.
    """
    common = short_config(tmp_path, data_dir, annotations, ["brain1", "breast1"], "data.val_fraction=0",
                          "train.max_steps=1", "train.amp=false", "augment.scale=[1.0, 1.0]",
                          "model.overrides={dropout=0.0}")
    run_training([*common, "--output", str(tmp_path / "one")], processes=1)
    run_training([*common, "--output", str(tmp_path / "two")], processes=2)
    one = load_file(str(tmp_path / "one" / "state" / "train.safetensors"))
    two = load_file(str(tmp_path / "two" / "state" / "train.safetensors"))
    config = load_config(common[1], [a for a in common[2:] if a != "--set"])
    initial = Trainer(config, tmp_path / "unused", Context(0, 1, 0, torch.device("cpu"))).network.state_dict()
    lr = config.optim.lr
    moved = 0
    for name, value in one.items():
        if name.startswith("model.") and value.is_floating_point():
            torch.testing.assert_close(two[name], value, rtol=0, atol=3 * lr, msg=name)
            moved += int(not torch.equal(value, initial[name[len("model."):]]))
    assert moved > 0.9 * sum(1 for v in initial.values() if v.is_floating_point())
    gradients = [name for name in one if name.endswith(".exp_avg") and one[name].norm() > 1e-8]
    assert len(gradients) > 100
    for name in gradients:
        # Relative to the gradient, or to 1e-5 for near-zero ones: a scalar whose terms cancel to 1e-6 (SFPM-f's
        # StarReLU scale) keeps the float32 reduction-order noise of its terms, about 3e-8.
        relative = float((one[name] - two[name]).norm() / max(float(one[name].norm()), 1e-5))
        assert relative < 0.02, f"{name}: gradients differ by {relative:.1%}"
    loss_one, loss_two = (float(read_log(tmp_path / run)[0]["train_loss"]) for run in ("one", "two"))
    assert loss_two == pytest.approx(loss_one, rel=1e-4)


def test_resume_gives_the_uninterrupted_runs_metrics(tmp_path, data_dir, annotations):
    common = short_config(tmp_path, data_dir, annotations, ["brain2", "breast1", "brain1"], "data.val_fraction=0.34",
                          "optim.t_max=2", "augment.rotate_degrees=10.0", "augment.intensity_shift=0.05",
                          "augment.text_noise=0.5")
    run_training([*common, "--set", "train.epochs=2", "--output", str(tmp_path / "straight")])
    run_training([*common, "--set", "train.epochs=1", "--output", str(tmp_path / "resumed")])
    run_training([*common, "--set", "train.epochs=2", "--output", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert len(straight) == len(resumed) == 2
    for key in ("train_loss", "val_loss", "val_dice", "val_dice_global", "lr"):
        assert resumed[1][key] == straight[1][key], key
    assert resumed[0]["train_loss"] == straight[0]["train_loss"]


def test_global_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    """Two torchrun processes, each with half of a batch, give the gradients and running statistics of one process
    with all of it (``batchnorm_processes.py``; run as the trainer is, so it also leaves the group as the trainer
    does: an earlier version of this test, with ``mp.spawn``, was killed by SIGABRT in CI as one process left)."""
    out = tmp_path / "g.pt"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get(
        "PYTHONPATH", "")])}
    done = subprocess.run([*launcher, str(Path(__file__).with_name("batchnorm_processes.py")), str(out)],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = torch.load(out, weights_only=True)
    distributed, whole = saved["distributed"], saved["whole"]
    assert set(distributed["grads"]) == set(whole["grads"]) and len(whole["grads"]) == 5
    for name, gradient in whole["grads"].items():
        torch.testing.assert_close(distributed["grads"][name], gradient, rtol=1e-4, atol=1e-7)
    for name, buffer in whole["running"].items():
        torch.testing.assert_close(distributed["running"][name], buffer, rtol=1e-5, atol=1e-6)


def test_leave_one_out_never_trains_on_the_held_out_case(tmp_path, data_dir, annotations):
    from Training.leave_one_out import main as leave_one_out

    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain2", "breast1"], annotations)
    repeated = manifest.read_text().splitlines()[1]  # a row written twice to weigh it (as in shipped.csv)
    manifest.write_text(manifest.read_text() + repeated + "\n")
    assert leave_one_out(["--config", str(CONFIGS / "shipped.toml"), "--output", str(tmp_path / "loo"),
                          "--set", f"data.manifest=\"{manifest}\"", "--set", "train.epochs=1",
                          "--set", "train.max_steps=1", "--set", "data.slices=\"lesion\""]) == 0
    for held_out, other in (("brain2", "breast1"), ("breast1", "brain2")):
        info = load_model(tmp_path / "loo" / held_out / "model.safetensors", "cpu").info
        assert info.training["train_cases"] == [other] and info.training["val_cases"] == []
    with open(tmp_path / "loo" / "loo.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case"] for row in rows] == ["brain2", "breast1", "mean"]
    assert "| **mean** |" in (tmp_path / "loo" / "loo.md").read_text()


def test_leave_one_out_resumes_an_interrupted_fold_and_skips_a_finished_one(tmp_path, data_dir, annotations):
    from Training.leave_one_out import main as leave_one_out

    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain2", "breast1"], annotations)
    common = ["--config", str(CONFIGS / "shipped.toml"), "--output", str(tmp_path / "loo"), "--cases", "brain2",
              "--set", f"data.manifest=\"{manifest}\"", "--set", "data.slices=\"lesion\"", "--set", "train.epochs=2"]
    log = tmp_path / "loo" / "brain2" / "log.csv"
    assert leave_one_out([*common, "--set", "train.max_steps=1"]) == 0  # stands for a run cut off after epoch 1
    assert len(log.read_text().splitlines()) == 2
    assert leave_one_out([*common, "--set", "train.max_steps=2"]) == 0
    assert [row["epoch"] for row in csv.DictReader(log.open())] == ["1", "2"]
    assert load_model(tmp_path / "loo" / "brain2" / "model.safetensors", "cpu").info.training["epoch"] == 2
    assert leave_one_out([*common, "--set", "train.max_steps=2"]) == 0
    assert len(log.read_text().splitlines()) == 3


def test_a_modality_without_an_intensity_entry_is_refused_by_name(tmp_path, data_dir, annotations):
    """A CT-only preprocessing never normalises MR cases through the CT window: declared modalities are refused
    before anything is read, guessed ones when the case is read; the message names the case and the modality."""
    ct_only = Preprocessing.from_metadata({"size": [256, 256],
                                           "intensity": {"CT": {"kind": "window", "low": -200, "high": 200}}})
    declared = read_manifest(write_manifest(tmp_path / "m.csv", data_dir, ["lung2", "brain1"], annotations))
    with pytest.raises(ValueError, match=r"'brain1' is MR.*no intensity entry for MR"):
        SliceDataset(declared, ct_only, slices="lesion")
    undeclared = tmp_path / "u.csv"
    undeclared.write_text("case,image,label,text\n"
                          f"brain1,{data_dir / 'brain1_image.nrrd'},{data_dir / 'brain1_label.nrrd'},a lesion\n")
    dataset = SliceDataset(read_manifest(undeclared), ct_only, slices="lesion")
    with pytest.raises(ValueError, match=r"'brain1' is MR.*no intensity entry for MR"):
        dataset[0]


@pytest.mark.parametrize("name", ["texlivernet", "mmrdl", "mmrdl-monuseg-glas"])
def test_paper_recipes_train_on_lesion_slices_with_every_modality_covered(name, tmp_path):
    """The TexLiverNet paper trains on tumour slices only (574 images from 20 3D-IRCADb scans); MMRDL's images
    each come with their own description. Built as the trainer builds it from the recipe's own manifest, every
    training slice shows the lesion its text describes, and every case's modality has its own normalisation."""
    config = load_config(CONFIGS / f"{name}.toml")
    spec = get_spec(config.model.architecture)
    preprocessing = Preprocessing.from_metadata(config.data.preprocessing or spec.default_preprocessing)
    cases = read_manifest(config.resolve(config.data.manifest))
    assert {case.modality for case in cases} <= {key.upper() for key in preprocessing.intensity}
    train, _ = split_cases(cases, config.data.val_fraction, config.data.split_seed)
    dataset = SliceDataset(train, preprocessing, config.data.orientation, config.data.slices,
                           config.data.empty_fraction, seed=config.data.split_seed)
    assert len(dataset) > 0 and all(item.has_lesion for item in dataset.items)


def test_empty_slices_are_trained_only_when_a_recipe_asks():
    """Without a data.slices entry a recipe trains on lesion slices: keeping empty ones is a choice to write down."""
    assert load_config(None).data.slices == "lesion"


def test_mmrdl_recipes_hold_the_papers_batches_and_a_cosine_that_anneals_before_early_stopping():
    """Batch 24 (MosMedData+) and 2 (MoNuSeg, GlaS); within the 50 epochs early stopping waits, the learning rate
    goes down from 1e-3 to the floor and back (LViT's restarts every 10 epochs), not flat at 1e-3."""
    from Training.trainer import cosine_schedule

    for name, batch in (("mmrdl", 24), ("mmrdl-monuseg-glas", 2)):
        config = load_config(CONFIGS / f"{name}.toml")
        optim = config.optim
        assert config.train.batch_size == batch and config.train.early_stop_patience == 50 and optim.lr == 1e-3
        factor = cosine_schedule(optim.lr, optim.min_lr, optim.t_max or config.train.epochs, optim.restarts)
        rates = [optim.lr * factor(epoch) for epoch in range(config.train.early_stop_patience)]
        assert max(rates) == pytest.approx(1e-3) and min(rates) < 1.5e-4
        assert sum(rate > 0.9e-3 for rate in rates) <= 0.3 * len(rates)  # 3 epochs of every 10
    single = cosine_schedule(1e-3, 0.0, 1000)
    assert min(1e-3 * single(epoch) for epoch in range(50)) > 0.99e-3  # the old single cosine: flat
    assert cosine_schedule(1.0, 0.0, 10)(25) == 0.0 and cosine_schedule(1.0, 0.0, 10, restarts=True)(20) == 1.0


def test_a_longer_text_max_tokens_reaches_tia(tmp_path, data_dir, annotations):
    """``text.max_tokens`` above TIA's default 128 sizes TIA's text positions too, so a long prompt runs."""
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["breast1"], annotations)
    config = load_config(CONFIGS / "texlivernet.toml", [f"data.manifest=\"{manifest}\"", *SHORT,
                                                        "data.val_fraction=0", "text.max_tokens=200"])
    trainer = Trainer(config, tmp_path / "run", Context(0, 1, 0, torch.device("cpu")))
    assert trainer.encoder.max_tokens == 200 and trainer.model_config.max_text_tokens == 200
    prompt = " ".join(["an enhancing mass with irregular margins in the right breast"] * 15)  # < 1,000 characters
    text = trainer.encoder.encode([prompt])
    assert text.tokens.shape[1] > 128
    trainer.network.eval()
    with torch.no_grad():
        assert trainer.network(torch.zeros(1, 1, 64, 64), text).shape == (1, 1, 64, 64)
    short = load_config(CONFIGS / "texlivernet.toml", [f"data.manifest=\"{manifest}\"", *SHORT,
                                                       "data.val_fraction=0", "text.max_tokens=200",
                                                       "model.overrides={max_text_tokens=100}"])
    with pytest.raises(ValueError, match="max_text_tokens = 100 is shorter"):
        Trainer(short, tmp_path / "short", Context(0, 1, 0, torch.device("cpu")))


def test_validation_logs_iou_with_dice(tmp_path, data_dir, annotations):
    """One validation case: IoU and Dice come from the same overlap, so IoU = Dice / (2 - Dice). (The output bias
    makes the untrained network mark most pixels, so both lie strictly between 0 and 1.)"""
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain2", "breast1"], annotations)
    config = load_config(CONFIGS / "texlivernet.toml", [f"data.manifest=\"{manifest}\"", *SHORT,
                                                        "data.val_fraction=0.5", "model.overrides={head_bias=5.0}"])
    trainer = Trainer(config, tmp_path / "run", Context(0, 1, 0, torch.device("cpu")))
    metrics = trainer.validate()
    assert 0.0 < metrics["val_dice"] < 1.0
    assert metrics["val_iou"] == pytest.approx(metrics["val_dice"] / (2 - metrics["val_dice"]))


def test_structure_manifests_name_each_structure_by_its_phrasings_with_each_case_s_label_values(tmp_path):
    """CT and MR label maps number structures differently; rows take each case's own values, only for structures
    present, and never a held-out paraphrase."""
    from Training.structures import CASES, STRUCTURES, label_values, write_manifest

    target = write_manifest(tmp_path / "m.csv", ["ct_a", "mr_a"])
    cases = {case.case: case for case in read_manifest(target)}
    assert set(cases) == {"ct_a", "mr_a"}
    for name, case in cases.items():
        values = label_values(CASES[name].table)
        expected = [(text, values[s.name]) for s in STRUCTURES if s.name in values for text in s.phrasings]
        assert [(t.text, t.label_value) for t in case.targets] == expected
    liver = next(s for s in STRUCTURES if s.name == "liver")
    assert {t.label_value for t in cases["ct_a"].targets if t.text == "the liver"} == {5}
    assert {t.label_value for t in cases["mr_a"].targets if t.text == "the liver"} == {
        label_values(CASES["mr_a"].table)["liver"]}
    trained = {t.text for case in cases.values() for t in case.targets}
    assert not trained & {p for s in STRUCTURES for p in s.paraphrases} and liver.prompt in trained
    shipped = read_manifest(Path(__file__).resolve().parents[2] / "Training" / "manifests" / "shipped.csv")
    assert [case.case for case in shipped] == ["ct_a", "mr_a", *PYRADIOMICS_CASES]
    assert [(t.text, t.label_value) for t in shipped[0].targets] == [(t.text, t.label_value)
                                                                    for t in cases["ct_a"].targets]
    assert all(len(case.targets) == 4 for case in shipped[2:])  # a lesion weighs as much as a structure


def test_a_second_stage_starts_from_the_first_stage_s_weights(tmp_path, data_dir, annotations):
    """model.init loads an earlier run's exported weights (not its optimizer); a checkpoint of another size is
    refused with one line that says what to match."""
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain1", "breast1"], annotations)
    base = [f"data.manifest=\"{manifest}\"", *SHORT, "data.val_fraction=0", "train.max_steps=2"]
    first = Trainer(load_config(CONFIGS / "texlivernet.toml", base), tmp_path / "first",
                    Context(0, 1, 0, torch.device("cpu")))
    first.fit()
    exported = load_file(tmp_path / "first" / "model.safetensors")
    second = Trainer(load_config(CONFIGS / "texlivernet.toml",
                                 [*base, f"model.init=\"{tmp_path / 'first' / 'model.safetensors'}\""]),
                     tmp_path / "second", Context(0, 1, 0, torch.device("cpu")))
    state = second.network.state_dict()
    assert set(exported) == set(state)
    assert all(torch.equal(exported[key], state[key]) for key in exported)
    assert second.optimizer.state_dict()["state"] == {}
    fresh = Trainer(load_config(CONFIGS / "texlivernet.toml", base), tmp_path / "fresh",
                    Context(0, 1, 0, torch.device("cpu"))).network.state_dict()
    assert not all(torch.equal(exported[key], fresh[key]) for key in exported)
    init = f"model.init=\"{tmp_path / 'first' / 'model.safetensors'}\""
    with pytest.raises(ValueError, match="another size or config") as wider:
        Trainer(load_config(CONFIGS / "texlivernet.toml", [*base, init, "model.overrides={head_width=24}"]),
                tmp_path / "wider", Context(0, 1, 0, torch.device("cpu")))
    assert "\n" not in str(wider.value)


def test_a_diverged_run_stops_at_the_first_non_finite_loss(tmp_path, data_dir, annotations):
    """A rate far too high drives the weights to inf/NaN; the run stops there with one line naming the rate, not
    after every remaining epoch of NaN losses (a head-and-neck candidate at batch 64 and 2e-3 went on for 29)."""
    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain1", "breast1"], annotations)
    config = load_config(CONFIGS / "texlivernet.toml", [f"data.manifest=\"{manifest}\"", *SHORT,
                                                        "data.val_fraction=0", "optim.lr=1e30",
                                                        "train.clip_grad_norm=0", "train.epochs=50"])
    trainer = Trainer(config, tmp_path / "run", Context(0, 1, 0, torch.device("cpu")))
    with pytest.raises(FloatingPointError, match=r"training loss became (nan|inf|-inf) at epoch \d+") as stopped:
        trainer.fit()
    assert "optim.lr (now 1e+30)" in str(stopped.value) and "\n" not in str(stopped.value)
