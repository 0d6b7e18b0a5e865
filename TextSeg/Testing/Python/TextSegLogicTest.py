"""TextSeg's logic in the real 3D Slicer application (run by ctest, or from Slicer's Python console).

The demonstration case (lung2, a real CT with a lung mass) is segmented through ``TextSegLogic`` with the shipped
demonstration model, or, while none ships, a small TexLiverNet made here with random weights. The tests check the
segment against the engine's own mask on the volume's grid, its name, terminology and tags, that the user's
segment survives and a re-run replaces its own segment, that a cancelled run adds nothing to the scene, and that
bad input is refused with a clear message.
"""

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# Where the demonstration case is looked for, relative to the repository; the first folder that has it wins
# ($TEXTSEG_DATA and TextSegLib/data/demo of the installed module are tried before these). A folder holds either
# TextSeg's bundled case (case.json naming the image, the label and the prompt) or the pyradiomics sample data
# (FALLBACK_CASE_image.nrrd and FALLBACK_CASE_label.nrrd, segmented with FALLBACK_PROMPT).
DEMO_FOLDERS = ("TextSegLib/data/demo", "../shared/data/pyradiomics")
FALLBACK_CASE = "lung2"
FALLBACK_PROMPT = "a large soft-tissue mass in the posterior left lower lung"
# The shipped demonstration model, used when the catalogue has it; otherwise the tests make a small random one.
DEMO_MODEL = "demo-texlivernet-small"
REPOSITORY = Path(__file__).resolve().parents[3]


def findDemoCase() -> dict:
    """The demonstration case: ``{"image": Path, "label": Path, "prompt": str}`` (see ``DEMO_FOLDERS``)."""
    import TextSegLib

    candidates = [Path(os.environ["TEXTSEG_DATA"])] if os.environ.get("TEXTSEG_DATA") else []
    candidates.append(Path(TextSegLib.__file__).resolve().parent / "data" / "demo")
    candidates += [(REPOSITORY / folder).resolve() for folder in DEMO_FOLDERS]
    for folder in candidates:
        if (folder / "case.json").is_file():
            case = json.loads((folder / "case.json").read_text())
            return {"image": folder / case["image"], "label": folder / case["label"], "prompt": case["prompt"]}
        if (folder / f"{FALLBACK_CASE}_image.nrrd").is_file():
            return {"image": folder / f"{FALLBACK_CASE}_image.nrrd", "label": folder / f"{FALLBACK_CASE}_label.nrrd",
                    "prompt": FALLBACK_PROMPT}
    raise FileNotFoundError(f"The demonstration case was not found in {[str(c) for c in candidates]}.")


def chooseModel(folder: Path, volumeArray: np.ndarray, prompt: str) -> Path:
    """The shipped demonstration model if the catalogue has it, else a small random one made in ``folder``."""
    from TextSegLib.checkpoints import Catalogue

    for entry in Catalogue().entries():
        if entry.id == DEMO_MODEL:
            return entry.path
    return makeSmallCheckpoint(folder / "small.safetensors", volumeArray, prompt)


def makeSmallCheckpoint(path: Path, volumeArray: np.ndarray, prompt: str) -> Path:
    """A small-preset TexLiverNet with random weights, calibrated on the case so that its mask is not empty.

    BatchNorm statistics come from a pass over a few windowed slices with the prompt's MiniLM features, and the
    output bias is shifted so that about a third of those voxels come out inside.
    """
    import torch

    from TextSegLib.checkpoints import save_checkpoint
    from TextSegLib.models import create_model, preset_config
    from TextSegLib.text import load_text_encoder

    torch.manual_seed(0)
    network = create_model("texlivernet", preset_config("texlivernet", "small", text_dim=384))
    depth = volumeArray.shape[0]
    slices = volumeArray[depth // 3: 2 * depth // 3: max(1, depth // 24)].astype(np.float32)
    images = torch.from_numpy(np.clip((slices + 200.0) / 400.0, 0.0, 1.0))[:, None]
    images = torch.nn.functional.interpolate(images, size=(256, 256), mode="bilinear", antialias=True)
    text = load_text_encoder({"source": "minilm", "max_tokens": network.config.max_text_tokens}) \
        .encode_cached(prompt).expand(images.shape[0])
    with torch.no_grad():
        network.train()
        network(images, text)
        network.eval()
        logits = network(images, text)
        network.head.bias -= torch.quantile(logits.flatten()[::11], 0.67)
    save_checkpoint(path, network, architecture="texlivernet",
                    text_encoder={"source": "minilm", "max_tokens": network.config.max_text_tokens},
                    name="TextSeg test model", description="random weights, for the module tests",
                    example_prompts=[prompt])
    return path


def nodeIds() -> list:
    """IDs of every node in the scene, in order."""
    return [slicer.mrmlScene.GetNthNode(n).GetID() for n in range(slicer.mrmlScene.GetNumberOfNodes())]


class TextSegLogicTest(ScriptedLoadableModuleTest):
    """TextSegLogic on the demonstration case."""

    def setUp(self) -> None:
        """Empty scene, models folder in a temporary folder, the demonstration case loaded."""
        slicer.mrmlScene.Clear()
        self._temporary = tempfile.TemporaryDirectory()
        self._savedModelsDir = os.environ.get("TEXTSEG_MODELS_DIR")
        os.environ["TEXTSEG_MODELS_DIR"] = str(Path(self._temporary.name) / "models")
        from TextSeg import TextSegLogic

        self.logic = TextSegLogic()
        self.logic.ensureDependencies(askConfirmation=False)
        self.case = findDemoCase()
        self.prompt = self.case["prompt"]
        self.volumeNode = slicer.util.loadVolume(str(self.case["image"]))
        self.checkpoint = chooseModel(Path(self._temporary.name), slicer.util.arrayFromVolume(self.volumeNode),
                                      self.prompt)

    def tearDown(self) -> None:
        """Restore the models folder and remove the temporary files."""
        if self._savedModelsDir is None:
            os.environ.pop("TEXTSEG_MODELS_DIR", None)
        else:
            os.environ["TEXTSEG_MODELS_DIR"] = self._savedModelsDir
        self._temporary.cleanup()

    def runTest(self) -> None:
        """Run all tests."""
        for test in (self.test_ProcessSegmentsTheDemoCase, self.test_CancelLeavesTheSceneAsItWas,
                     self.test_BadInputIsRefused):
            self.setUp()
            try:
                test()
            finally:
                self.tearDown()

    def _userSegment(self, segmentationNode: slicer.vtkMRMLSegmentationNode) -> str:
        """The case's reference lesion as a segment the user made, on the volume's grid."""
        labelNode = slicer.util.loadLabelVolume(str(self.case["label"]))
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(self.volumeNode)
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, segmentationNode)
        slicer.mrmlScene.RemoveNode(labelNode)
        segmentId = segmentationNode.GetSegmentation().GetNthSegmentID(0)
        segmentationNode.GetSegmentation().GetSegment(segmentId).SetName("my lesion")
        return segmentId

    def test_ProcessSegmentsTheDemoCase(self) -> None:
        """The segment equals the engine's mask on the volume's grid and carries name, terminology and tags."""
        from TextSegLib.checkpoints import file_sha256
        from TextSegLib.inference import InferenceEngine, load_model
        from TextSegLib.segmentations import TAG_CHECKPOINT, TAG_MODEL, TAG_PROMPT, segment_tag, volume_from_node
        from TextSegLib.terminology import terminology_for_prompt

        self.delayDisplay("Segmenting the demonstration case")
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "results")
        userId = self._userSegment(segmentationNode)
        userVoxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, userId, self.volumeNode)

        segmentId = self.logic.process(self.volumeNode, segmentationNode, self.prompt, str(self.checkpoint),
                                       device="CPU")
        expected = InferenceEngine(load_model(self.checkpoint, "cpu")).segment(
            volume_from_node(self.volumeNode), self.prompt).mask
        self.assertTrue(0 < expected.sum() < expected.size)
        voxels = slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, self.volumeNode)
        self.assertEqual(voxels.shape, slicer.util.arrayFromVolume(self.volumeNode).shape)
        np.testing.assert_array_equal(voxels != 0, expected != 0)

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        self.assertEqual(segment.GetName(), self.prompt)
        self.assertEqual(segment.GetTerminology(), terminology_for_prompt(self.prompt).to_slicer())
        self.assertIn("SCT^39607008^Lung", segment.GetTerminology())
        self.assertEqual(segment_tag(segment, TAG_PROMPT), self.prompt)
        self.assertEqual(segment_tag(segment, TAG_MODEL), self.checkpoint.name.removesuffix(".safetensors"))
        self.assertEqual(segment_tag(segment, TAG_CHECKPOINT), file_sha256(self.checkpoint))
        self.assertIs(segmentationNode.GetNodeReference(
            segmentationNode.GetReferenceImageGeometryReferenceRole()), self.volumeNode)
        self.assertIsNotNone(segmentationNode.GetDisplayNode())

        self.delayDisplay("Running the same prompt again with another threshold and a probability volume")
        probabilityNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "probability")
        again = self.logic.process(self.volumeNode, segmentationNode, self.prompt, str(self.checkpoint),
                                   device="CPU", threshold=0.7, probabilityVolume=probabilityNode)
        self.assertEqual(again, segmentId)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 2)
        probability = slicer.util.arrayFromVolume(probabilityNode)
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, self.volumeNode) != 0,
            probability > 0.7)
        np.testing.assert_array_equal(
            slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, userId, self.volumeNode), userVoxels)
        self.assertEqual(segmentationNode.GetSegmentation().GetSegment(userId).GetName(), "my lesion")
        self.delayDisplay("Test passed")

    def test_CancelLeavesTheSceneAsItWas(self) -> None:
        """Cancelling a background run between batches adds no node and no segment."""
        self.delayDisplay("Cancelling a run")
        before = nodeIds()
        run = self.logic.startProcessing(self.volumeNode, self.prompt, str(self.checkpoint), device="CPU",
                                         batchSize=2)
        run.start()
        deadline = time.monotonic() + 300
        while run.progress[0] == 0 and not run.finished and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        run.cancel()
        self.assertTrue(run.wait(300))
        self.assertIsNone(run.error)
        self.assertIsNone(run.result)
        self.assertLess(run.progress[0], run.progress[1])
        self.assertIsNone(self.logic.finishProcessing(run, None))
        self.assertEqual(nodeIds(), before)
        self.delayDisplay("Test passed")

    def test_BadInputIsRefused(self) -> None:
        """Missing nodes, an empty prompt, an unknown model and a bad threshold raise ValueError."""
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        before = nodeIds()
        checkpoint = str(self.checkpoint)
        for arguments, message in (
            ((None, segmentationNode, self.prompt, checkpoint), "No input volume"),
            ((self.volumeNode, None, self.prompt, checkpoint), "No segmentation node"),
            ((self.volumeNode, segmentationNode, "  ", checkpoint), "The prompt is empty"),
            ((self.volumeNode, segmentationNode, self.prompt, "no-such-model"), "No model named"),
        ):
            with self.assertRaisesRegex(ValueError, message):
                self.logic.process(*arguments)
        with self.assertRaisesRegex(ValueError, "threshold"):
            self.logic.process(self.volumeNode, segmentationNode, self.prompt, checkpoint, threshold=1.5)
        self.assertEqual(nodeIds(), before)
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 0)
