"""TextSeg: text-guided segmentation of CT and MR volumes in 3D Slicer.

The module is thin: everything that computes lives in ``TextSegLib`` (pure Python, no Qt). This file holds the
Slicer parts:

- ``TextSeg``: module metadata, help and the papers to cite;
- ``TextSegParameterNode``: the user's choices, saved with the scene;
- ``TextSegWidget``: the panel (``Resources/UI/TextSeg.ui``); Apply runs the engine on a worker thread, turns into
  Cancel, and a timer on the main thread reads the progress (Qt widgets and MRML nodes are only touched there);
- ``TextSegLogic``: dependency installation, the model catalogue, ``process()`` for the Python console and batch
  scripts, and the two halves of a background run (``startProcessing`` / ``finishProcessing``);
- ``TextSegTest``: panel tests for the real application (the logic tests are in ``Testing/Python``).

Nothing heavy is imported when Slicer loads the module: torch and the networks are imported after the dependencies
are installed, the first time they are needed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import math
import re
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import ctk
import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (
    Choice,
    GuiConnector,
    WithinRange,
    parameterNodeGuiConnector,
    parameterNodeWrapper,
    unannotatedType,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:
    from TextSegLib.checkpoints import CatalogueEntry
    from TextSegLib.inference import SegmentationResult
    from TextSegLib.volumes import Volume

MODULE_DIR = Path(__file__).resolve().parent
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
TORCH_REQUIREMENTS = ("torch>=2.5", "torchvision>=0.20")
RECENT_PROMPTS_KEY = "TextSeg/RecentPrompts"
RECENT_PROMPTS_LIMIT = 15
DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}
MINIMUM_FREE_GPU_BYTES = 2 << 30
GPU_BYTES_PER_CHECKPOINT_BYTE = 4


def _addSourceTreeToPath() -> None:
    """In a source checkout (module path ``<repository>/TextSeg``) TextSegLib sits beside the module folder."""
    repository = MODULE_DIR.parent
    beside = not (MODULE_DIR / "TextSegLib").is_dir() and (repository / "TextSegLib").is_dir()
    if beside and str(repository) not in sys.path:
        sys.path.append(str(repository))


_addSourceTreeToPath()


#
# TextSeg
#


class TextSeg(ScriptedLoadableModule):
    """Module metadata: title, category, contributors, help and acknowledgement."""

    def __init__(self, parent: qt.QObject) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TextSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TextSeg developers"]
        self.parent.helpText = _("""
<p>Segment a CT or MR volume by describing what to find, for example
<i>a large soft-tissue mass in the posterior left lower lung</i>.</p>
<ol>
<li>Choose the input volume and a model (each model lists what it was trained for and example prompts;
<b>Import...</b> adds a TextSeg checkpoint file).</li>
<li>Type the prompt (the menu beside it offers the model's examples and your recent prompts).</li>
<li>Choose the output segmentation (or let TextSeg create one) and, if you like, the segment name.</li>
<li>Press <b>Apply</b>. The first time, TextSeg offers to install PyTorch (through the PyTorch extension) and its
Python packages. While it runs, Apply turns into <b>Cancel</b>; cancelling leaves the scene as it was.</li>
</ol>
<p>Each prompt gives one segment, named after the prompt, with standard terminology where the prompt names a known
structure, and tags recording the prompt, the model and the checkpoint's SHA-256. Running the same prompt again
replaces its own segment; other segments are never changed. Advanced: device (auto, CPU or GPU; the CPU is used
when the GPU lacks memory), batch size, threshold, and an optional probability volume.</p>
<p>Python console: <code>slicer.util.getModuleLogic("TextSeg").process(volumeNode, segmentationNode,
"a large soft-tissue mass in the posterior left lower lung", "my-model")</code> returns the segment ID.
Batch: <code>Slicer --no-main-window --python-script TextSegBatch.py -- &lt;textseg segment options&gt;</code>.</p>
<p>If you use TextSeg, please cite the paper of the network you used:</p>
<ul>
<li>Xiaoyan Jiang, Zhi Zhou, Hailing Wang, Guozhong Wang, Zhijun Fang. <i>TexLiverNet: Leveraging Medical
Knowledge and Spatial-Frequency Perception for Enhanced Liver Tumor Segmentation.</i></li>
<li>Chao Huang, Weichao Cai, Qiuping Jiang, Zhihua Wang. <i>Multimodal Representation Distribution Learning for
Medical Image Segmentation.</i></li>
<li>Ngo Thanh Trung, Tran Long Vu, Doan Hoang Long. <i>FreqMedCLIP: Frequency Information for Text-Guided Medical
Image Segmentation.</i></li>
</ul>
""")
        self.parent.acknowledgementText = _("""
TextSeg implements the TexLiverNet, multimodal representation distribution learning and FreqMedCLIP networks from
their papers. It runs on PyTorch, installed through the SlicerPyTorch extension (PyTorchUtils), and uses
Hugging Face transformers, open_clip, timm, safetensors, PyWavelets and slicerio. The demonstration case comes from
the pyradiomics sample data (BSD-3-Clause).
""")


#
# Parameter node
#


@parameterNodeGuiConnector
class TextSegItemDataComboBoxConnector(GuiConnector):
    """Binds a ``ctkComboBox`` whose items carry string data (TextSeg's model IDs) to a ``str`` parameter.

    The items shown (model names) differ from the stored values (catalogue IDs) and the list is refilled while the
    module runs, so the connector reads and writes item data rather than the text. An ID not in the list leaves the
    box without a current item.
    """

    @staticmethod
    def canRepresent(widget: qt.QWidget, datatype: object) -> bool:
        """A ctkComboBox bound to a str."""
        return type(widget) is ctk.ctkComboBox and unannotatedType(datatype) is str

    @staticmethod
    def create(widget: qt.QWidget, datatype: object) -> TextSegItemDataComboBoxConnector | None:
        """The connector for ``widget``, or None when it cannot represent ``datatype``."""
        if TextSegItemDataComboBoxConnector.canRepresent(widget, datatype):
            return TextSegItemDataComboBoxConnector(widget)
        return None

    def __init__(self, widget: ctk.ctkComboBox) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentIndexChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentIndexChanged.disconnect(self.changed)

    def widget(self) -> ctk.ctkComboBox:
        """The bound combo box."""
        return self._widget

    def read(self) -> str:
        """ID of the current item ("" when there is none)."""
        index = self._widget.currentIndex
        return str(self._widget.itemData(index) or "") if index >= 0 else ""

    def write(self, value: str) -> None:
        """Select the item whose data is ``value``."""
        self._widget.currentIndex = self._widget.findData(value)


@parameterNodeWrapper
class TextSegParameterNode:
    """The user's choices in the panel (saved with the scene).

    inputVolume: the volume to segment.
    modelId: catalogue ID of the model.
    prompt: what to segment.
    segmentName: name of the segment ("" = the prompt).
    outputSegmentation: segmentation that receives the segment (None = create one).
    device: "auto" (GPU when usable), "CPU" or "GPU".
    batchSize: slices per forward pass (0 = chosen for the device).
    threshold: probability above which a voxel is inside.
    probabilityVolume: volume that receives the probability map (None = none).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = ""
    prompt: str = ""
    segmentName: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    batchSize: Annotated[int, WithinRange(0, 512)] = 0
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    probabilityVolume: vtkMRMLScalarVolumeNode


#
# TextSegWidget
#


class TextSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The TextSeg panel."""

    def __init__(self, parent: qt.QWidget | None = None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._runOutputs = (None, None)
        self._runTimer = None
        self._models = {}
        self._dependenciesReady = False

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TextSegLogic()

        self._runTimer = qt.QTimer()
        self._runTimer.setInterval(100)
        self._runTimer.connect("timeout()", self._pollRun)
        self._promptMenu = qt.QMenu(self.ui.promptMenuButton)
        self._promptMenu.connect("aboutToShow()", self._fillPromptMenu)
        self.ui.promptMenuButton.setMenu(self._promptMenu)
        self._recentPrompts = qt.QStringListModel(self.logic.recentPrompts())
        self._promptCompleter = qt.QCompleter(self._recentPrompts, self.ui.promptLineEdit)
        self._promptCompleter.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.promptLineEdit.setCompleter(self._promptCompleter)
        self.ui.progressBar.hide()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelComboBox.connect("activated(int)", self.onModelChosen)
        self.ui.promptLineEdit.connect("returnPressed()", self.onPromptReturnPressed)

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._run is not None:
            self._run.cancel()
        self._runTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.refreshModels()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller: vtk.vtkObject, event: int) -> None:
        """Called just before the scene is closed: a running segmentation is cancelled."""
        if self._run is not None:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: vtk.vtkObject, event: int) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Use the scene's parameter node and pick the first volume if none is chosen."""
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: TextSegParameterNode | None) -> None:
        """Bind the panel to ``inputParameterNode`` (widgets carry the "SlicerParameterName" property)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def refreshModels(self) -> None:
        """Fill the model chooser from the catalogue (once the dependencies are installed)."""
        self._dependenciesReady = not self.logic.missingDependencies()
        combo = self.ui.modelComboBox
        if not self._dependenciesReady:
            combo.defaultText = _("Press Apply to install TextSeg's dependencies")
            self._setStatus(_("TextSeg needs PyTorch and a few Python packages: press Apply to install them."))
            self._updateGui()
            return
        try:
            entries = self.logic.catalogueEntries()
        except Exception as error:
            logging.exception("TextSeg could not read its model catalogue")
            self._setStatus(_("The model catalogue could not be read: {error}").format(error=error), warning=True)
            entries = []
        self._models = {entry.id: entry for entry in entries}
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for entry in entries:
            combo.addItem(entry.title if entry.title == entry.id else f"{entry.title} ({entry.id})", entry.id)
        combo.defaultText = _("No model installed: use Import...") if not entries else ""
        combo.blockSignals(wasBlocked)
        if self._parameterNode:
            if self._parameterNode.modelId not in self._models and entries:
                self._parameterNode.modelId = entries[0].id
            combo.currentIndex = combo.findData(self._parameterNode.modelId)
        self._updateGui()

    def _updateGui(self, caller: vtk.vtkObject | None = None, event: int | None = None) -> None:
        """Model description, terminology preview, Apply button state."""
        parameters = self._parameterNode
        entry = self._models.get(parameters.modelId) if parameters else None
        if entry is None:
            self.ui.modelDescriptionLabel.text = ""
        else:
            lines = [entry.info.description or entry.architecture_title]
            if entry.info.example_prompts:
                lines.append(_("For example: {prompt}").format(prompt=entry.info.example_prompts[0]))
            if entry.text_role:
                lines.append(entry.text_role)
            self.ui.modelDescriptionLabel.text = "\n".join(lines)
        prompt = parameters.prompt.strip() if parameters else ""
        if prompt:
            from TextSegLib.terminology import terminology_for_prompt

            self.ui.terminologyLabel.text = _("Terminology: {label}").format(
                label=terminology_for_prompt(prompt).label)
        else:
            self.ui.terminologyLabel.text = ""
        self.ui.segmentNameLineEdit.placeholderText = prompt or _("the prompt")
        self._updateApplyButton()

    def _updateApplyButton(self) -> None:
        button = self.ui.applyButton
        for section in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                        self.ui.advancedCollapsibleButton):
            section.enabled = self._run is None
        if self._run is not None:
            button.text = _("Cancel")
            button.toolTip = _("Stop after the current batch of slices; nothing is added to the scene.")
            button.enabled = not self._run.cancelled
            return
        button.text = _("Apply")
        if not self._dependenciesReady:
            button.toolTip = _("Install PyTorch and TextSeg's Python packages (you are asked first).")
            button.enabled = True
            return
        parameters = self._parameterNode
        missing = []
        if not parameters or not parameters.inputVolume:
            missing.append(_("an input volume"))
        if not parameters or not parameters.modelId:
            missing.append(_("a model"))
        if not parameters or not parameters.prompt.strip():
            missing.append(_("a prompt"))
        button.enabled = not missing
        button.toolTip = (_("Choose {items}.").format(items=", ".join(missing)) if missing
                          else _("Segment the input volume for the prompt."))

    def _setStatus(self, text: str, warning: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #d07000" if warning else "")

    def _fillPromptMenu(self) -> None:
        """Example prompts of the chosen model, then the recent prompts."""
        menu = self._promptMenu
        menu.clear()
        entry = self._models.get(self._parameterNode.modelId) if self._parameterNode else None
        sections = [
            (_("Examples"), entry.info.example_prompts if entry else []),
            (_("Recent"), self.logic.recentPrompts()),
        ]
        for title, prompts in sections:
            if not prompts:
                continue
            menu.addSection(title)
            for prompt in prompts:
                action = menu.addAction(prompt if len(prompt) <= 80 else prompt[:77] + "...")
                action.setToolTip(prompt)
                action.connect("triggered()", lambda prompt=prompt: self._usePrompt(prompt))
        if menu.isEmpty():
            menu.addAction(_("No examples or recent prompts yet")).enabled = False

    def _usePrompt(self, prompt: str) -> None:
        self._parameterNode.prompt = prompt

    def onModelChosen(self, index: int) -> None:
        """The user picked a model: the threshold follows the model's own."""
        entry = self._models.get(str(self.ui.modelComboBox.itemData(index) or ""))
        if entry is not None and self._parameterNode:
            self._parameterNode.threshold = min(0.99, max(0.01, float(entry.info.threshold)))

    def onPromptReturnPressed(self) -> None:
        """Return in the prompt box works as Apply."""
        if self.ui.applyButton.enabled and self._run is None:
            self.onApplyButton()

    def onImportModel(self) -> None:
        """Copy a checkpoint file into the user's model folder and select it."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import a TextSeg model"), "", _("TextSeg checkpoints (*.safetensors)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be imported."), waitCursor=True):
            self.logic.ensureDependencies(askConfirmation=True)
            entry = self.logic.importModel(path)
            self.refreshModels()
            self._parameterNode.modelId = entry.id
            self._setStatus(_("Imported {model} into {folder}.").format(model=entry.id, folder=entry.path.parent))

    def onApplyButton(self) -> None:
        """Apply: install the dependencies if needed, else start segmenting. Cancel: stop the run."""
        if self._run is not None:
            self._run.cancel()
            self._setStatus(_("Cancelling after the current batch..."))
            self._updateApplyButton()
            return
        if not self._dependenciesReady:
            with slicer.util.tryWithErrorDisplay(_("TextSeg's dependencies could not be installed."), waitCursor=True):
                self.logic.ensureDependencies(askConfirmation=True)
                self.refreshModels()
                self._setStatus(_("Dependencies installed. Choose a model, type a prompt and press Apply."))
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("TextSeg could not start."), waitCursor=True):
            run = self.logic.startProcessing(
                parameters.inputVolume, parameters.prompt, parameters.modelId,
                segmentName=parameters.segmentName, device=parameters.device, batchSize=parameters.batchSize,
                threshold=parameters.threshold, probability=parameters.probabilityVolume is not None,
            )
            self._run = run
            self._runOutputs = (parameters.outputSegmentation, parameters.probabilityVolume)
            run.start()
            self._runTimer.start()
            self.ui.progressBar.value = 0
            self.ui.progressBar.show()
            status = _("Segmenting on {device}...").format(device=run.device.upper())
            self._setStatus(" ".join([status, *run.notes]), warning=bool(run.notes))
            self._updateApplyButton()

    def _pollRun(self) -> None:
        """Timer on the main thread: show the worker's progress; store the result when it has finished."""
        run = self._run
        done, total = run.progress
        self.ui.progressBar.maximum = max(total, 1)
        self.ui.progressBar.value = done
        if not run.finished:
            return
        self._runTimer.stop()
        self._run = None
        self.ui.progressBar.hide()
        self._updateApplyButton()
        segmentationNode, probabilityVolume = self._runOutputs
        self._runOutputs = (None, None)
        try:
            with slicer.util.tryWithErrorDisplay(_("Segmentation failed; the scene was not changed."),
                                                 waitCursor=True):
                outcome = self.logic.finishProcessing(run, segmentationNode, probabilityVolume)
        except Exception as error:
            self._setStatus(_("Failed: {error}").format(error=error), warning=True)
            raise
        if outcome is None:
            self._setStatus(_("Cancelled; nothing was added."))
            return
        segmentationNode, segmentId = outcome
        if self._parameterNode:
            self._parameterNode.outputSegmentation = segmentationNode
        self.logic.addRecentPrompt(run.prompt)
        self._recentPrompts.setStringList(self.logic.recentPrompts())
        self._setStatus(self.logic.describeResult(run, segmentationNode, segmentId), warning=bool(run.notes))


#
# Background run
#


class TextSegRun:
    """One segmentation: the engine runs in :meth:`run` (on a worker thread after :meth:`start`).

    Only plain Python state is shared with the main thread: the progress (under a lock), the cancel token, and
    the outcome once ``finished`` is set. MRML nodes are read before the run starts and written after it ends, on
    the main thread, by :meth:`TextSegLogic.finishProcessing`.
    """

    def __init__(self, inputVolume: vtkMRMLScalarVolumeNode, volume: Volume, prompt: str,
                 modelPaths: Sequence[Path], device: str,
                 batchSize: int | None, threshold: float | None, probability: bool, segmentName: str,
                 notes: Sequence[str] = ()) -> None:
        from TextSegLib.inference import CancelToken

        self.inputVolume = inputVolume
        self.volume = volume
        self.prompt = prompt
        self.modelPaths = list(modelPaths)
        self.device = device
        self.batchSize = batchSize
        self.threshold = threshold
        self.probability = probability
        self.segmentName = segmentName
        self.notes = list(notes)
        self.result = None
        self.error = None
        self._cancelToken = CancelToken()
        self._lock = threading.Lock()
        self._progress = (0, 0)
        self._finished = threading.Event()
        self._outOfMemoryNote = _("The GPU ran out of memory; TextSeg used the CPU instead.")

    @property
    def progress(self) -> tuple[int, int]:
        """Slices done and slices in all (0, 0 before the first batch)."""
        with self._lock:
            return self._progress

    @property
    def finished(self) -> bool:
        """True once the run has ended (result, cancel or error)."""
        return self._finished.is_set()

    @property
    def cancelled(self) -> bool:
        """True once cancel was asked for."""
        return self._cancelToken.cancelled

    def cancel(self) -> None:
        """Ask the engine to stop before its next batch (any thread)."""
        self._cancelToken.cancel()

    def start(self) -> None:
        """Run on a worker thread."""
        threading.Thread(target=self.run, name="TextSeg inference", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run has ended; False on timeout."""
        return self._finished.wait(timeout)

    def run(self) -> None:
        """Load the models and segment; on CUDA out-of-memory, run again on the CPU."""
        import torch

        try:
            try:
                self.result = self._segment(self.device)
            except torch.OutOfMemoryError:
                if self.device == "cpu":
                    raise
                torch.cuda.empty_cache()
                self.notes.append(self._outOfMemoryNote)
                logging.warning("TextSeg: out of GPU memory, running on the CPU")
                self.device = "cpu"
                self.result = self._segment("cpu")
        except Exception as error:
            self.error = error
        finally:
            self._finished.set()

    def _report(self, done: int, total: int) -> None:
        with self._lock:
            self._progress = (done, total)

    def _segment(self, device: str) -> SegmentationResult | None:
        from TextSegLib.inference import InferenceEngine, load_model

        models = [load_model(path, device) for path in self.modelPaths]
        engine = InferenceEngine(models, batch_size=self.batchSize)
        return engine.segment(self.volume, self.prompt, threshold=self.threshold, probability=self.probability,
                              progress=self._report, cancel=self._cancelToken, modality=self.volume.modality)


#
# TextSegLogic
#


class TextSegLogic(ScriptedLoadableModuleLogic):
    """Everything the panel does, usable without it (console, batch scripts, tests)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> TextSegParameterNode:
        """The scene's TextSeg parameter node (created when missing)."""
        return TextSegParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------------------------------- dependencies

    @staticmethod
    def requirements() -> list[str]:
        """Python packages TextSeg installs with pip (pinned as in pyproject.toml; torch comes from PyTorch)."""
        lines = REQUIREMENTS_FILE.read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

    @staticmethod
    def _satisfied(requirement: str) -> bool:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(==|>=)\s*([0-9][0-9A-Za-z.+]*)", requirement)
        if match is None:
            raise ValueError(f"TextSeg cannot read the requirement {requirement!r} in {REQUIREMENTS_FILE}")
        name, operator, wanted = match.groups()
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return False

        def release(version: str) -> tuple[int, ...]:
            return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])

        if operator == "==":
            return release(installed) == release(wanted)
        return release(installed) >= release(wanted)

    def missingDependencies(self) -> list[str]:
        """Requirements not yet satisfied, torch and torchvision first (reads package metadata, imports nothing)."""
        return [requirement for requirement in (*TORCH_REQUIREMENTS, *self.requirements())
                if not self._satisfied(requirement)]

    @staticmethod
    def interactive() -> bool:
        """True when the user can be asked (not in testing mode, not headless)."""
        return not slicer.app.testingEnabled() and not slicer.app.commandOptions().noMainWindow

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install what is missing: torch and torchvision with the PyTorch extension, the rest with pip.

        The user is asked first when ``askConfirmation`` is true and Slicer is interactive; in testing and batch
        mode nothing is asked. Raises RuntimeError when the user declines, when the PyTorch extension is missing or
        too old a torch is already loaded, and when packages are still missing afterwards.
        """
        missing = self.missingDependencies()
        if not missing:
            return
        torchMissing = any(item in TORCH_REQUIREMENTS for item in missing)
        packages = [item for item in missing if item not in TORCH_REQUIREMENTS]
        if askConfirmation and self.interactive():
            text = _("TextSeg needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                     "PyTorch is installed by the PyTorch extension (about 2-6 GB, depending on your GPU), the "
                     "others with pip. This can take several minutes. Install them now?").format(
                         packages="\n".join(missing))
            if not slicer.util.confirmOkCancelDisplay(text, windowTitle=_("TextSeg: install dependencies")):
                raise RuntimeError(_("TextSeg cannot run without its Python packages; nothing was installed."))
        if torchMissing:
            self._installTorch()
        if packages:
            logging.info("TextSeg: installing %s", " ".join(packages))
            slicer.util.pip_install(packages)
        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise RuntimeError(_("These packages are still missing after installation: {packages}. Restart Slicer "
                                 "and press Apply again.").format(packages=", ".join(still)))

    @staticmethod
    def _installTorch() -> None:
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(_("TextSeg needs the PyTorch extension: install it from the Extensions Manager, "
                                 "restart Slicer and press Apply again.")) from error
        if "torch" in sys.modules and not TextSegLogic._satisfied(TORCH_REQUIREMENTS[0]):
            raise RuntimeError(_("TextSeg needs PyTorch {requirement}, but an older PyTorch is loaded. Update it "
                                 "in the PyTorch Utils module, restart Slicer and press Apply again.").format(
                                     requirement=TORCH_REQUIREMENTS[0]))
        logging.info("TextSeg: installing PyTorch through the PyTorch extension")
        torchRequirement = TORCH_REQUIREMENTS[0].removeprefix("torch")
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                              torchVersionRequirement=torchRequirement)
        if torch is None:
            raise RuntimeError(_("PyTorch was not installed; TextSeg cannot run without it."))

    # ------------------------------------------------------------------------------------------- catalogue

    @staticmethod
    def catalogueEntries() -> list[CatalogueEntry]:
        """Models the user can pick: shipped with TextSeg and imported (``CatalogueEntry`` objects)."""
        from TextSegLib.checkpoints import Catalogue

        return Catalogue().entries()

    @staticmethod
    def importModel(path: str) -> CatalogueEntry:
        """Check a checkpoint file fully and copy it into the user's models folder; return its catalogue entry."""
        from TextSegLib.checkpoints import Catalogue

        return Catalogue().import_model(path)

    # ------------------------------------------------------------------------------------------ recent prompts

    @staticmethod
    def recentPrompts() -> list[str]:
        """Prompts used before, newest first (application settings)."""
        value = qt.QSettings().value(RECENT_PROMPTS_KEY)
        if not value:
            return []
        return [value] if isinstance(value, str) else [str(item) for item in value]

    @staticmethod
    def addRecentPrompt(prompt: str) -> None:
        """Put ``prompt`` first in the recent prompts."""
        prompts = [prompt] + [item for item in TextSegLogic.recentPrompts() if item != prompt]
        qt.QSettings().setValue(RECENT_PROMPTS_KEY, prompts[:RECENT_PROMPTS_LIMIT])

    # ------------------------------------------------------------------------------------------- processing

    @staticmethod
    def chooseDevice(device: str, modelPaths: Sequence[Path]) -> tuple[str, list[str]]:
        """Device to run on ("cpu" or "cuda") and warnings for the user.

        ``device`` is "auto", "CPU" or "GPU" (or "cpu", "cuda"). A GPU with less free memory than the models
        need (an estimate from their file sizes, at least ``MINIMUM_FREE_GPU_BYTES``) is not used: TextSeg warns
        and runs on the CPU.
        """
        import torch

        wanted = DEVICES.get(device, device)
        if wanted not in ("auto", "cpu", "cuda"):
            raise ValueError(_("Unknown device {device!r}: use auto, CPU or GPU.").format(device=device))
        if wanted == "cpu":
            return "cpu", []
        if not torch.cuda.is_available():
            if wanted == "cuda":
                return "cpu", [_("No usable GPU was found; TextSeg runs on the CPU.")]
            return "cpu", []
        free, _total = torch.cuda.mem_get_info()
        needed = max(MINIMUM_FREE_GPU_BYTES,
                     GPU_BYTES_PER_CHECKPOINT_BYTE * sum(Path(path).stat().st_size for path in modelPaths))
        if free < needed:
            message = _("The GPU has {free:.1f} GB free, TextSeg needs about {needed:.1f} GB: it runs on the CPU "
                        "(slower).").format(free=free / 2**30, needed=needed / 2**30)
            logging.warning("TextSeg: %s", message)
            return "cpu", [message]
        return "cuda", []

    def startProcessing(self, inputVolume: vtkMRMLScalarVolumeNode | None, prompt: str,
                        modelId: str | Sequence[str], segmentName: str = "", device: str = "auto",
                        batchSize: int | None = None, threshold: float | None = None, probability: bool = False,
                        modality: str | None = None) -> TextSegRun:
        """Check the inputs and prepare a run (main thread); call ``start()`` or ``run()`` on what it returns.

        Arguments as for :meth:`process`; ``probability`` asks for the probability map. The volume's voxels are
        copied now, so the run does not read MRML nodes. Raises ValueError on bad input.
        """
        from TextSegLib.checkpoints import Catalogue
        from TextSegLib.segmentations import volume_from_node
        from TextSegLib.text import validate_prompt

        prompt = validate_prompt(prompt)
        modelIds = [modelId] if isinstance(modelId, str) else list(modelId)
        if not modelIds or not all(modelIds):
            raise ValueError(_("No model chosen: pick one from the catalogue or import a checkpoint."))
        if batchSize is not None and batchSize < 0:
            raise ValueError(_("The batch size must be at least 1 (0 chooses it automatically)."))
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(_("The threshold must lie between 0 and 1."))
        if modality not in (None, "CT", "MR"):
            raise ValueError(_("The modality must be CT or MR."))
        volume = volume_from_node(inputVolume, modality)
        catalogue = Catalogue()
        modelPaths = [catalogue.resolve(item) for item in modelIds]
        resolvedDevice, notes = self.chooseDevice(device, modelPaths)
        return TextSegRun(inputVolume, volume, prompt, modelPaths, resolvedDevice, batchSize or None, threshold,
                          probability, " ".join(segmentName.split()), notes)

    def finishProcessing(self, run: TextSegRun, segmentationNode: vtkMRMLSegmentationNode | None = None,
                         probabilityVolume: vtkMRMLScalarVolumeNode | None = None,
                         showResult: bool = True) -> tuple[vtkMRMLSegmentationNode, str] | None:
        """Store a finished run's result in the scene (main thread); None when it was cancelled.

        ``segmentationNode`` None creates a segmentation named after the volume. Re-raises the run's error. On any
        error nothing stays in the scene: a segmentation created here is removed again.
        Returns ``(segmentationNode, segmentId)``.
        """
        from TextSegLib.segmentations import store_result, update_volume_node

        if run.error is not None:
            raise run.error
        if run.result is None:
            return None
        inputVolume = run.inputVolume
        for node in (inputVolume, segmentationNode, probabilityVolume):
            if node is not None and not slicer.mrmlScene.IsNodePresent(node):
                raise ValueError(_("{name} was removed while TextSeg was running; nothing was added.").format(
                    name=node.GetName()))
        created = segmentationNode is None
        if created:
            segmentationNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} TextSeg"))
        try:
            segmentId = store_result(segmentationNode, inputVolume, run.result, run.segmentName or None)
        except Exception:
            if created:
                slicer.mrmlScene.RemoveNode(segmentationNode)
            raise
        if probabilityVolume is not None and run.result.probability is not None:
            update_volume_node(probabilityVolume, run.result.probability, inputVolume)
            probabilityVolume.CreateDefaultDisplayNodes()
        if showResult:
            self.showResult(inputVolume, segmentationNode, segmentId)
        return segmentationNode, segmentId

    @staticmethod
    def showResult(inputVolume: vtkMRMLScalarVolumeNode, segmentationNode: vtkMRMLSegmentationNode,
                   segmentId: str) -> None:
        """Show the segment in the slice views (over the input volume) and in 3D."""
        segmentationNode.CreateDefaultDisplayNodes()
        segmentationNode.GetDisplayNode().SetSegmentVisibility(segmentId, True)
        segmentationNode.CreateClosedSurfaceRepresentation()
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(background=inputVolume)

    @staticmethod
    def describeResult(run: TextSegRun, segmentationNode: vtkMRMLSegmentationNode, segmentId: str) -> str:
        """One line for the status: the segment, its volume, the time and any warning."""
        result = run.result
        millilitres = result.voxel_count * math.prod(run.volume.spacing) / 1000.0
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        text = _("{name}: {voxels} voxels ({ml:.1f} mL) in {seconds:.1f} s on {device}.").format(
            name=segment.GetName(), voxels=result.voxel_count, ml=millilitres, seconds=result.seconds,
            device=run.device.upper())
        if result.empty:
            text += " " + _("Nothing was found above the threshold: the segment is empty.")
        return " ".join([text, *run.notes])

    def process(self, inputVolume: vtkMRMLScalarVolumeNode | None,
                segmentationNode: vtkMRMLSegmentationNode | None, prompt: str, modelId: str | Sequence[str],
                segmentName: str | None = None, device: str = "auto", batchSize: int | None = None,
                threshold: float | None = None, probabilityVolume: vtkMRMLScalarVolumeNode | None = None,
                modality: str | None = None, showResult: bool = True) -> str:
        """Segment ``inputVolume`` for ``prompt`` and return the ID of the segment added to ``segmentationNode``.

        Runs synchronously (Python console, batch scripts, tests)::

            logic = slicer.util.getModuleLogic("TextSeg")
            segmentId = logic.process(volumeNode, segmentationNode,
                                      "a large soft-tissue mass in the posterior left lower lung", "my-model")

        Args:
            inputVolume: scalar volume node to segment (its own geometry; a parent transform is followed).
            segmentationNode: segmentation node that receives the segment; a segment made before from the same
                prompt is replaced, other segments are left as they are.
            prompt: what to segment.
            modelId: catalogue ID or checkpoint file (a list of them averages an ensemble).
            segmentName: segment name (default: the prompt).
            device: "auto" (GPU when usable), "CPU"/"cpu" or "GPU"/"cuda"; a GPU short of memory falls back to
                the CPU with a warning in the log.
            batchSize: slices per forward pass (None or 0: chosen for the device).
            threshold: probability above which a voxel is inside (default: the model's).
            probabilityVolume: scalar volume node that receives the probability map, or None.
            modality: "CT" or "MR" (default: guessed from the intensities).
            showResult: show the segment in the slice views and in 3D.

        Raises:
            ValueError: a missing or empty input, an empty prompt, an unknown model, a bad threshold or batch size.
        """
        if segmentationNode is None:
            raise ValueError(_("No segmentation node: pass the segmentation that should receive the segment."))
        self.ensureDependencies(askConfirmation=True)
        run = self.startProcessing(inputVolume, prompt, modelId, segmentName or "", device, batchSize, threshold,
                                   probabilityVolume is not None, modality)
        run.run()
        for note in run.notes:
            logging.warning("TextSeg: %s", note)
        outcome = self.finishProcessing(run, segmentationNode, probabilityVolume, showResult)
        return outcome[1]


#
# TextSegTest
#


class TextSegTest(ScriptedLoadableModuleTest):
    """Panel tests in the real application: the .ui loads and every parameter reaches its widget.

    The logic tests (the real case, geometry, tags, replacing, cancelling) are in ``Testing/Python``.
    """

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run all tests."""
        self.setUp()
        self.test_ParametersReachTheirWidgets()
        self.setUp()
        self.test_ApplyStateFollowsTheInputs()

    def _widget(self) -> TextSegWidget:
        slicer.util.selectModule("TextSeg")
        return slicer.util.getModuleWidget("TextSeg")

    def test_ParametersReachTheirWidgets(self) -> None:
        """Values set in the parameter node show in the panel, and edits in the panel reach the node."""
        self.delayDisplay("Parameter node and panel")
        widget = self._widget()
        parameters = widget.logic.getParameterNode()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
        parameters.inputVolume = volume
        parameters.outputSegmentation = segmentation
        parameters.prompt = "a small solid nodule in the right upper lung"
        parameters.segmentName = "nodule"
        parameters.device = "CPU"
        parameters.batchSize = 8
        parameters.threshold = 0.3
        ui = widget.ui
        self.assertIs(ui.inputVolumeSelector.currentNode(), volume)
        self.assertIs(ui.outputSegmentationSelector.currentNode(), segmentation)
        self.assertEqual(ui.promptLineEdit.text, parameters.prompt)
        self.assertEqual(ui.segmentNameLineEdit.text, "nodule")
        self.assertEqual(ui.deviceComboBox.currentText, "CPU")
        self.assertEqual(ui.batchSizeSpinBox.value, 8)
        self.assertAlmostEqual(ui.thresholdSliderWidget.value, 0.3)
        self.assertIn("Nodule in Right Lung", ui.terminologyLabel.text)
        ui.promptLineEdit.text = "the liver"
        ui.batchSizeSpinBox.value = 0
        self.assertEqual(parameters.prompt, "the liver")
        self.assertEqual(parameters.batchSize, 0)
        self.assertEqual(ui.batchSizeSpinBox.text, ui.batchSizeSpinBox.specialValueText)
        self.delayDisplay("Test passed")

    def test_ApplyStateFollowsTheInputs(self) -> None:
        """Apply needs a volume, a model and a prompt (once the dependencies are there)."""
        self.delayDisplay("Apply button")
        widget = self._widget()
        parameters = widget.logic.getParameterNode()
        parameters.prompt = ""
        if not widget._dependenciesReady:
            self.assertTrue(widget.ui.applyButton.enabled)
            self.assertEqual(widget.ui.applyButton.text, "Apply")
            return
        self.assertFalse(widget.ui.applyButton.enabled)
        parameters.inputVolume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
        parameters.prompt = "the liver"
        self.assertEqual(widget.ui.applyButton.enabled, bool(parameters.modelId))
        self.delayDisplay("Test passed")
