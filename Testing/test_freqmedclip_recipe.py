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
