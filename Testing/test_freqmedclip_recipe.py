"""FreqMedCLIP's input range and training recipe on the real cases: what reaches the pretrained ViT, slice filtering
and balanced sampling, 70/20/10 stratified patient splits, the three-checkpoint ensemble as one catalogue model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from TextSegLib.manifests import ManifestCase, Target
from TextSegLib.models import create_model, get_spec, preset_config
from TextSegLib.models.freqmedclip import CLIP_MEAN, CLIP_STD
from TextSegLib.preprocessing import Preprocessing

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
    CLIP's range of [0, 1] images; the paper's z-score would give [-5.4, 16.5] and is refused."""
    from TextSegLib.checkpoints import save_checkpoint
    from TextSegLib.inference import InferenceEngine, load_model
    from TextSegLib.volumes import read_volume
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
        from TextSegLib.volumes import read_volume

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
    from TextSegLib.manifests import split_cases, split_patients

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
    batch = next(iter(DataLoader(dataset, batch_size=4, sampler=BalancedSampler(flags, seed=1))))
    assert batch["image"].shape == (4, 3, 224, 224)
