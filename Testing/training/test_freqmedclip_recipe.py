"""FreqMedCLIP's input range and training recipe on the real cases: what reaches the pretrained ViT, slice filtering
and balanced sampling, 70/20/10 stratified patient splits, the three-checkpoint ensemble as one catalogue model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from TextSegLib.engine.preprocessing import Preprocessing
from TextSegLib.io.manifests import ManifestCase, Target
from TextSegLib.models.freqmedclip_config import CLIP_MEAN, CLIP_STD
from TextSegLib.models.registry import create_model, get_spec, preset_config

BRAIN_TEXT = "a contrast-enhancing lesion in the left cerebral hemisphere with irregular margins"
# [0, 1] images after CLIP's mean/std: the range the frozen ViT was trained on
VIT_LOW = min((0.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True))  # -1.79
VIT_HIGH = max((1.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True))  # 2.15


def brain1(data_dir) -> ManifestCase:
    return ManifestCase("brain1", data_dir / "brain1_image.nrrd", data_dir / "brain1_label.nrrd",
                        [Target(BRAIN_TEXT)], modality="MR")


def vit_inputs(model, images: torch.Tensor, text) -> torch.Tensor:
    """What the ViT's patch embedding receives when ``model`` runs on ``images``."""
    seen = []
    hook = model.semantic.backbone.patch_embed.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad():
        model(images, text)
    hook.remove()
    return torch.cat(seen)


def test_mr_reaches_the_vit_in_its_training_range(data_dir, vit_folder, minilm, tmp_path):
    """The real brain MR, prepared by the training data path and by the inference engine, reaches the ViT within
    CLIP's range of [0, 1] images; the paper's z-score gives [-5.4, 21.2] and is refused."""
    from TextSegLib.engine.checkpoints import save_checkpoint
    from TextSegLib.engine.inference import InferenceEngine
    from TextSegLib.engine.loading import load_model
    from TextSegLib.io.volumes import read_volume
    from Training.data import SliceDataset

    spec = get_spec("freqmedclip")
    preprocessing = Preprocessing.from_metadata(spec.default_preprocessing, channels=3)
    dataset = SliceDataset([brain1(data_dir)], preprocessing)
    images = torch.stack([dataset[i]["image"] for i in range(0, len(dataset), 3)])
    assert images.min() == 0.0 and 0.9 < images.max() <= 1.0 + 1e-5
    torch.manual_seed(0)
    model = create_model("freqmedclip", preset_config("freqmedclip", "small", vision_source=f"local-dir:{vit_folder}",
                                                      text_dim=384, pooled_dim=384)).eval()
    text = minilm.encode_cached(BRAIN_TEXT).expand(len(images))
    seen = vit_inputs(model, images, text)
    assert VIT_LOW - 1e-4 <= float(seen.min()) < -1.7 and 1.5 < float(seen.max()) <= VIT_HIGH + 1e-4

    zscore = Preprocessing.from_metadata({"size": [224, 224], "intensity": {"MR": {"kind": "zscore"}}}, channels=3)
    z_images = torch.stack([SliceDataset([brain1(data_dir)], zscore)[i]["image"] for i in range(0, len(dataset), 3)])
    z_seen = vit_inputs(model, z_images, text)
    assert float(z_seen.min()) < -5 and float(z_seen.max()) > 15  # what the paper's z-score fed the ViT
    with pytest.raises(ValueError, match=r"FreqMedCLIP takes intensities in \[0, 1\].*MR \(zscore\)"):
        zscore.check_range(spec.input_range, spec.title)

    path = tmp_path / "freqmedclip.safetensors"
    save_checkpoint(path, model, architecture="freqmedclip", text_encoder={"source": "minilm"})
    loaded = load_model(path, "cpu")
    engine_seen = []
    loaded.network.semantic.backbone.patch_embed.register_forward_pre_hook(
        lambda _, args: engine_seen.append(args[0].float()))
    volume = read_volume(data_dir / "brain1_image.nrrd")
    InferenceEngine(loaded, batch_size=5, amp=False).segment(volume, BRAIN_TEXT)
    engine_seen = torch.cat(engine_seen)
    assert len(engine_seen) == volume.array.shape[0]
    assert VIT_LOW - 1e-4 <= float(engine_seen.min()) < -1.7 and 1.5 < float(engine_seen.max()) <= VIT_HIGH + 1e-4


def test_every_default_normalisation_of_freqmedclip_stays_in_unit_range(data_dir):
    spec = get_spec("freqmedclip")
    preprocessing = Preprocessing.from_metadata(spec.default_preprocessing, channels=3)
    preprocessing.check_range(spec.input_range, spec.title)
    for case, modality in (("lung2", "CT"), ("brain2", "MR"), ("breast1", "MR")):
        from TextSegLib.io.volumes import read_volume

        array = read_volume(data_dir / f"{case}_image.nrrd").array
        mapping = preprocessing.intensity_for(modality).mapping(array)
        x = preprocessing.prepare(torch.from_numpy(np.ascontiguousarray(array[::4], dtype=np.float32)), mapping)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 + 1e-5


# ------------------------------------------------------------------------------------- splits, slices, sampling


def synthetic_cohort(ct: int, mr: int) -> list[ManifestCase]:
    from pathlib import Path

    return [ManifestCase(f"{modality.lower()}{i:02d}", Path(f"{modality}{i}.nrrd"), None, [Target("x")],
                         modality=modality) for modality, n in (("CT", ct), ("MR", mr)) for i in range(n)]


def test_70_20_10_stratified_patient_splits():
    from TextSegLib.io.manifests import split_cases, split_patients

    cases = synthetic_cohort(ct=20, mr=10)
    train, val, test = split_patients(cases, 0.2, 0.1, seed=4, stratify="modality")
    assert (len(train), len(val), len(test)) == (21, 6, 3)
    assert sorted(c.case for c in train + val + test) == sorted(c.case for c in cases)  # every patient once
    by_modality = {name: [c.modality for c in split] for name, split in (("val", val), ("test", test))}
    assert sorted(by_modality["val"]) == ["CT"] * 4 + ["MR"] * 2 and sorted(by_modality["test"]) == ["CT"] * 2 + ["MR"]
    assert split_patients(cases, 0.2, 0.1, seed=4, stratify="modality")[2] == test  # seeded
    assert split_patients(cases, 0.2, 0.1, seed=5, stratify="modality")[2] != test
    # unstratified, without a test share: the split split_cases always made
    assert split_patients(cases, 0.2, 0.0, seed=3)[:2] == split_cases(cases, 0.2, seed=3)
    # the five real cases (2 CT, 3 MR): three to train on, one each to validate and test
    few = synthetic_cohort(ct=2, mr=3)
    assert [len(s) for s in split_patients(few, 0.2, 0.1, stratify="modality")] == [3, 1, 1]
    fixed = [dataclasses_replace(few[0], split="test"), *few[1:]]
    assert few[0].case in [c.case for c in split_patients(fixed, 0.2, 0.1)[2]]
    with pytest.raises(ValueError, match="leave cases to train on"):
        split_patients(cases, 0.7, 0.3)
    with pytest.raises(ValueError, match="stratify"):
        split_patients(cases, 0.2, 0.1, stratify="scanner")


def dataclasses_replace(case: ManifestCase, **changes) -> ManifestCase:
    import dataclasses

    return dataclasses.replace(case, **changes)


def padded_brain(data_dir, folder):
    """brain1 with four blank slices and two nearly blank ones (a 2 % rim) added below and above its 25, as BraTS
    volumes have above and below the head; geometry extended along k."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(data_dir / "brain1_image.nrrd"))
    label = sitk.ReadImage(str(data_dir / "brain1_label.nrrd"))
    array, labels = sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(label)
    blank = np.zeros((3, *array.shape[1:]), array.dtype)
    rim = blank.copy()
    rim[:, :, :3] = array.max()  # 3 of 256 columns: 1.2 % of the slice
    paths = []
    for name, volume, pad, rim_pad in (("image", array, blank, rim), ("label", labels, blank.astype(labels.dtype),
                                                                     blank.astype(labels.dtype))):
        out = sitk.GetImageFromArray(np.concatenate([pad, rim_pad[:1], volume, rim_pad[:1], pad]))
        out.SetSpacing(image.GetSpacing())
        out.SetDirection(image.GetDirection())
        origin = np.asarray(image.GetOrigin()) - 4 * image.GetSpacing()[2] * np.asarray(image.GetDirection())[2::3]
        out.SetOrigin(tuple(origin))
        paths.append(folder / f"brain1_padded_{name}.nrrd")
        sitk.WriteImage(out, str(paths[-1]))
    return ManifestCase("brain1", paths[0], paths[1], [Target(BRAIN_TEXT)], modality="MR")


def test_uninformative_slices_are_filtered_and_lesion_slices_kept(data_dir, tmp_path):
    from Training.data import SliceDataset

    case = padded_brain(data_dir, tmp_path)
    preprocessing = Preprocessing.from_metadata(get_spec("freqmedclip").default_preprocessing, channels=3)
    everything = SliceDataset([case], preprocessing)
    filtered = SliceDataset([case], preprocessing, min_content=0.05)
    assert len(everything) == 25 + 8
    kept = sorted(item.slice for item in filtered.items)
    assert len(kept) == 25 and kept == list(range(4, 29))  # the 8 added slices dropped, the real 25 kept
    lesion = {item.slice for item in everything.items if item.has_lesion}
    assert lesion and lesion <= set(kept)
    assert {item.slice for item in SliceDataset([case], preprocessing, min_content=1.0).items} == lesion
    with pytest.raises(ValueError, match="min_content"):
        SliceDataset([case], preprocessing, min_content=5)


def test_balanced_sampling_draws_as_many_target_slices_as_empty_ones(data_dir):
    from torch.utils.data import DataLoader

    from Training.data import SliceDataset
    from Training.sampling import BalancedSampler

    preprocessing = Preprocessing.from_metadata(get_spec("freqmedclip").default_preprocessing, channels=3)
    dataset = SliceDataset([brain1(data_dir)], preprocessing)
    flags = [item.has_lesion for item in dataset.items]
    assert 0 < sum(flags) < len(flags) / 2  # the real case is imbalanced: fewer lesion slices than empty ones
    drawn = []
    for rank in (0, 1):
        sampler = BalancedSampler(flags, num_replicas=2, rank=rank, seed=7)
        sampler.set_epoch(3)
        drawn.append(list(sampler))
        assert len(drawn[-1]) == len(sampler) == -(-len(flags) // 2)
    together = drawn[0] + drawn[1]
    positives = sum(flags[i] for i in together)
    assert abs(positives - len(together) / 2) <= 1
    empty = [i for i in together if not flags[i]]
    assert len(set(empty)) == len(empty)  # the larger group is drawn without replacement
    assert {i for i in together if flags[i]} == {i for i, f in enumerate(flags) if f}  # the smaller one cycled whole
    again = BalancedSampler(flags, num_replicas=2, rank=0, seed=7)
    again.set_epoch(3)
    assert list(again) == drawn[0]
    again.set_epoch(4)
    assert list(again) != drawn[0]
    assert all(i in range(len(flags)) for i in BalancedSampler([True] * 5))  # one group only
    short = BalancedSampler(flags, seed=7, samples=10)  # a short epoch: ten draws, five of each group
    assert len(short) == 10 and sum(flags[i] for i in short) == 5 and len(set(short)) == 10
    with pytest.raises(ValueError, match="at least one sample"):
        BalancedSampler(flags, samples=0)
    batch = next(iter(DataLoader(dataset, batch_size=4, sampler=BalancedSampler(flags, seed=1))))
    assert batch["image"].shape == (4, 3, 224, 224)


# ------------------------------------------------------------------------------------------------ the ensemble

LUNG_TEXT = "a large soft-tissue mass in the posterior left lower lung"


@pytest.fixture(scope="module")
def seed_checkpoints(tmp_path_factory, vit_folder, biomedclip_like_folder, data_dir):
    """Three small FreqMedCLIPs of one config (seeds 0-2), calibrated on real lung2 slices, saved as checkpoints."""
    from testkit import calibrated_model

    from TextSegLib.engine.checkpoints import save_checkpoint
    from TextSegLib.text.sources import load_text_encoder

    source = f"open_clip:local-dir:{biomedclip_like_folder}"
    encoder = load_text_encoder(source)
    folder = tmp_path_factory.mktemp("seeds")
    paths = []
    for seed in range(3):
        paths.append(folder / f"seed-{seed}.safetensors")
        save_checkpoint(paths[-1], calibrated_model(vit_folder, encoder, data_dir, seed), architecture="freqmedclip",
                        text_encoder={"source": source, "max_tokens": 40}, name="small FreqMedCLIP",
                        example_prompts=[LUNG_TEXT], training={"val_dice": 0.1 * seed, "test_cases": ["brain2"]})
    return paths


def test_three_runs_export_as_one_catalogue_model_that_averages_them(seed_checkpoints, tmp_path, lung2):
    from safetensors.torch import load_file

    from TextSegLib.engine.catalogue import Catalogue
    from TextSegLib.engine.checkpoints import load_checkpoint
    from TextSegLib.engine.inference import InferenceEngine
    from TextSegLib.engine.loading import load_model
    from TextSegLib.io.volumes import Volume
    from TextSegLib.models.ensemble import Ensemble
    from Training.ensemble import export_ensemble

    path = tmp_path / "freqmedclip-ensemble.safetensors"
    info = export_ensemble(seed_checkpoints, path)
    assert info.members == 3 and info.name == "small FreqMedCLIP (ensemble of 3)"
    assert info.training["val_dice"] == [0.0, 0.1, 0.2] and info.training["test_cases"] == ["brain2"]
    stored = load_file(str(path))
    assert not any(".semantic.backbone." in key for key in stored)  # the frozen ViT is rebuilt, stored by none
    assert {key.split(".")[1] for key in stored} == {"0", "1", "2"}

    catalogue = Catalogue(user_dir=tmp_path / "models")
    catalogue.import_model(path, "freqmedclip-ensemble")
    (entry,) = [e for e in catalogue.entries() if not e.shipped]
    assert entry.id == "freqmedclip-ensemble" and entry.info.members == 3 and entry.architecture_title == "FreqMedCLIP"

    network, _ = load_checkpoint(entry.path)
    assert isinstance(network, Ensemble) and len(network.members) == 3
    assert network.members[2].semantic.backbone is network.members[0].semantic.backbone  # one copy of the ViT
    separate = [load_checkpoint(p)[0] for p in seed_checkpoints]
    image = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    text = load_model(seed_checkpoints[0], "cpu").text_encoder.encode_cached(LUNG_TEXT)
    with torch.no_grad():
        mean = torch.stack([torch.sigmoid(m(image, text)) for m in separate]).mean(0)
        torch.testing.assert_close(torch.sigmoid(network(image, text)), mean, atol=1e-6, rtol=0)

    slab = Volume.from_sitk(lung2.to_sitk()[:, :, 25:28], source="lung2 slab")
    one_file = InferenceEngine(load_model(entry.id, "cpu", catalogue), batch_size=3).segment(slab, LUNG_TEXT,
                                                                                           probability=True)
    three = InferenceEngine([load_model(p, "cpu") for p in seed_checkpoints], batch_size=3).segment(
        slab, LUNG_TEXT, probability=True)
    assert 0 < one_file.voxel_count < one_file.mask.size
    # the file averages at 224 x 224, the engine after resizing to 512 x 512: the same up to resampling
    assert np.abs(one_file.probability - three.probability).mean() < 0.01
    agree = np.count_nonzero(one_file.mask & three.mask)
    assert 2 * agree / (one_file.voxel_count + three.voxel_count) > 0.95


def test_only_runs_of_one_recipe_make_an_ensemble(seed_checkpoints, vit_folder, biomedclip_like_folder, tmp_path):
    from TextSegLib.engine.checkpoints import CheckpointError, save_checkpoint
    from Training.ensemble import export_ensemble

    other = tmp_path / "other.safetensors"
    model = create_model("freqmedclip", preset_config("freqmedclip", "small", vision_source=f"local-dir:{vit_folder}",
                                                      text_dim=32, pooled_dim=16, use_lffi=False))
    save_checkpoint(other, model, architecture="freqmedclip",
                    text_encoder={"source": f"open_clip:local-dir:{biomedclip_like_folder}", "max_tokens": 40})
    with pytest.raises(CheckpointError, match=r"differs from .* in config"):
        export_ensemble([seed_checkpoints[0], other], tmp_path / "mixed.safetensors")
    assert not (tmp_path / "mixed.safetensors").exists()


def test_the_recipe_trains_an_ensemble_of_seeds_on_a_stratified_split(tmp_path, data_dir, annotations, vit_folder):
    """Training/ensemble.py with the paper config (shortened): one run per seed on one patient split with a held-out
    test patient, joined into one file; a second call trains nothing."""
    from testkit import CONFIGS, SHORT, write_manifest

    from TextSegLib.engine.checkpoints import read_checkpoint_info
    from Training.ensemble import main

    manifest = write_manifest(tmp_path / "m.csv", data_dir, ["brain1", "brain2", "breast1"], annotations)
    overrides = [f"data.manifest=\"{manifest}\"", *SHORT, "data.val_fraction=0.0", "data.test_fraction=0.34",
                 "train.max_steps=1", f"model.overrides={{vision_source=\"local-dir:{vit_folder}\"}}"]
    arguments = ["--config", str(CONFIGS / "freqmedclip.toml"), "--output", str(tmp_path / "run"), "--seeds", "3", "4"]
    for override in overrides:
        arguments += ["--set", override]
    assert main(arguments) == 0
    info = read_checkpoint_info(tmp_path / "run" / "model.safetensors")
    assert info.members == 2 and info.training["seeds"] == [3, 4]
    (held_out,) = info.training["test_cases"]
    assert held_out not in info.training["train_cases"] and len(info.training["train_cases"]) == 2
    members = [read_checkpoint_info(tmp_path / "run" / f"seed-{s}" / "model.safetensors") for s in (3, 4)]
    assert members[0].training["train_cases"] == members[1].training["train_cases"]  # one split for every seed
    assert members[0].training["config"]["data"]["sampling"] == "balanced"
    stamps = [(tmp_path / "run" / f"seed-{s}" / "model.safetensors").stat().st_mtime_ns for s in (3, 4)]
    assert main(arguments) == 0
    assert stamps == [(tmp_path / "run" / f"seed-{s}" / "model.safetensors").stat().st_mtime_ns for s in (3, 4)]
