"""TextSeg: text-guided segmentation of CT and MR volumes in 3D Slicer.

The module is thin: everything that computes lives in ``TextSegLib`` (pure Python, no Qt). This file holds the
Slicer parts:

- ``TextSeg``: module metadata, help and the papers to cite;
- ``TextSegParameterNode``: the user's choices, saved with the scene;
- ``TextSegWidget``: the panel (``Resources/UI/TextSeg.ui``); Apply sends the volume to the segmentation worker,
  turns into Cancel, and a timer on the main thread polls the worker (Qt widgets and MRML nodes are only touched
  there). What waits on the worker (starting it, its health check, the upload, the model list) runs on a
  background thread (``TextSegTask``) that the same timer polls, so the panel never freezes;
- ``TextSegLogic``: dependency installation, the worker's model catalogue (listing and importing), ``process()``
  for the Python console and batch scripts, and the two halves of a background run (``startProcessing`` /
  ``finishProcessing``);
- ``TextSegTest``: panel tests for the real application (the logic tests are in ``Testing/Python``).

Segmentation never runs in Slicer's own process: Slicer's main thread holds the GIL while it idles in the Qt event
loop, so a Python thread there barely runs. A worker process (``textseg serve``, :mod:`TextSegLib.service`: started
on this computer on first use by ``TextSegLib.service.local.LocalWorker``, or a TextSeg server given under
Advanced) keeps the models and encoded prompts loaded between runs; a crash or out-of-memory there is reported and
the next run starts a fresh worker. The worker also lists the models and imports checkpoints, so Slicer's process
never loads torch.

This file must parse on Python 3.9 (Slicer 5.8 and older) so that it can say which Slicer it needs instead of
failing on a syntax error; TextSegLib (Python 3.11 and later) is only imported once that check has passed.
"""

from __future__ import annotations

import importlib.metadata
import logging
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if TYPE_CHECKING:
    from TextSegLib.service.client import ImportedModel, RemoteWorker
    from TextSegLib.service.protocol import ModelChoice

MODULE_DIR = Path(__file__).resolve().parent
REQUIREMENTS_FILE = MODULE_DIR / "Resources" / "requirements.txt"
TORCH_REQUIREMENTS = ("torch>=2.5", "torchvision>=0.20")
MINIMUM_SLICER = (5, 10)
MINIMUM_PYTHON = (3, 11)
RECENT_PROMPTS_KEY = "TextSeg/RecentPrompts"
SERVER_TOKEN_KEY = "TextSeg/ServerToken"
RECENT_PROMPTS_LIMIT = 15
POLL_INTERVAL_MS = 100
# The panel's device names and the library's (``TextSegLib.core.options.DEVICES``, not importable here: TextSegLib
# is imported only after the version check).
DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}


def _addSourceTreeToPath() -> None:
    """In a source checkout (module path ``<repository>/TextSeg``) TextSegLib sits beside the module folder."""
    repository = MODULE_DIR.parent
    beside = not (MODULE_DIR / "TextSegLib").is_dir() and (repository / "TextSegLib").is_dir()
    if beside and str(repository) not in sys.path:
        sys.path.append(str(repository))


_addSourceTreeToPath()


def unsupportedReason() -> str:
    """Why this Slicer cannot run TextSeg ("" when it can): TextSeg needs Slicer 5.10 or later.

    Slicer 5.10 is the first release with Python 3.11 or later (``Slicer_REQUIRED_PYTHON_VERSION`` in Slicer's
    top-level CMakeLists.txt: 3.9.10 up to 5.8, 3.12.10 from 5.10).
    """
    slicerVersion = (int(slicer.app.majorVersion), int(slicer.app.minorVersion))
    if slicerVersion >= MINIMUM_SLICER and sys.version_info[:2] >= MINIMUM_PYTHON:
        return ""
    return _("TextSeg needs 3D Slicer {minimum} or later (with Python {python} or later); this is Slicer {slicer} "
             "with Python {current}. Install a newer 3D Slicer from download.slicer.org.").format(
                 minimum=".".join(map(str, MINIMUM_SLICER)), python=".".join(map(str, MINIMUM_PYTHON)),
                 slicer=".".join(map(str, slicerVersion)), current=".".join(map(str, sys.version_info[:2])))


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
<p>Segment a CT or MR volume by describing what to find, for example <i>the liver</i> or
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
when the GPU lacks memory), batch size, threshold, an optional probability volume, and the address of a TextSeg
server (<code>textseg serve</code>) to segment on another computer, for example a GPU server.</p>
<p>Python console: <code>slicer.util.getModuleLogic("TextSeg").process(volumeNode, segmentationNode,
"the liver", "abdomen-freqmedclip-small")</code> returns the segment ID.
Batch: <code>Slicer --no-main-window --python-script TextSegBatch.py -- &lt;textseg segment options&gt;</code>.</p>
<p>TextSeg needs 3D Slicer 5.10 or later (Python 3.11 or later).</p>
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
Hugging Face transformers, open_clip, timm, safetensors, PyWavelets and slicerio. The demonstration cases come from
the test data of the TotalSegmentator project (patient B, the default, Apache-2.0) and the pyradiomics sample data
(lung2, BSD-3-Clause).
""")


#
# Parameter node
#


@parameterNodeWrapper
class TextSegParameterNode:
    """The user's choices in the panel (saved with the scene).

    inputVolume: the volume to segment.
    modelId: catalogue ID of the model (the model chooser is bound by hand, see ``TextSegWidget.onModelChosen``).
    prompt: what to segment.
    segmentName: name of the segment ("" = the prompt).
    outputSegmentation: segmentation that receives the segment (None = create one).
    device: "auto" (GPU when usable), "CPU" or "GPU".
    batchSize: slices per forward pass (0 = chosen for the device).
    threshold: probability above which a voxel is inside.
    probabilityVolume: volume that receives the probability map (None = none).
    serverUrl: address of a TextSeg server ("" = a worker process on this computer).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = ""
    prompt: str = ""
    segmentName: str = ""
    outputSegmentation: vtkMRMLSegmentationNode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    batchSize: Annotated[int, WithinRange(0, 512)] = 0
    # From TextSegLib.core.options.THRESHOLD_STEP to 1 - THRESHOLD_STEP (TextSegLib cannot be imported here).
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = 0.5
    probabilityVolume: vtkMRMLScalarVolumeNode
    serverUrl: str = ""


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
        self._catalogue = None
        self._catalogueStatus = ""  # what the model list last put on the status line (it clears it when it can)
        self._models = {}
        self._dependenciesReady = False

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it (or say which Slicer TextSeg needs)."""
        ScriptedLoadableModuleWidget.setup(self)
        reason = unsupportedReason()
        if reason:
            label = qt.QLabel(reason)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        # What Apply needs, imported while the module opens (a few hundred ms on a cold start) rather than when Apply
        # must answer at once.
        importlib.import_module("TextSegLib.app.mrml")
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/TextSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = TextSegLogic()

        self._runTimer = qt.QTimer()
        self._runTimer.setInterval(POLL_INTERVAL_MS)
        self._runTimer.connect("timeout()", self._onTimer)
        self._promptMenu = qt.QMenu(self.ui.promptMenuButton)
        self._promptMenu.connect("aboutToShow()", self._fillPromptMenu)
        self.ui.promptMenuButton.setMenu(self._promptMenu)
        self._recentPrompts = qt.QStringListModel(self.logic.recentPrompts())
        self._promptCompleter = qt.QCompleter(self._recentPrompts, self.ui.promptLineEdit)
        self._promptCompleter.setCaseSensitivity(qt.Qt.CaseInsensitive)
        self.ui.promptLineEdit.setCompleter(self._promptCompleter)
        self.ui.progressBar.hide()
        self.ui.serverTokenLineEdit.text = str(qt.QSettings().value(SERVER_TOKEN_KEY) or "")

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        # The model chooser shows names and stores catalogue IDs (item data), so it is bound by hand: Slicer's own
        # QComboBoxToStringableConnector claims every QComboBox/ctkComboBox bound to a str and requires a Choice
        # annotation (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, v5.10.0 to v5.12.3 and master).
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.promptLineEdit.connect("returnPressed()", self.onPromptReturnPressed)
        self.ui.serverLineEdit.connect("editingFinished()", self.refreshModels)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onServerTokenEdited)

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: a running segmentation is
        cancelled and the worker process on this computer is stopped (a server is left running)."""
        if self._run is not None:
            self._run.cancel()
            self._run = None
        self._catalogue = None
        if self._runTimer is not None:
            self._runTimer.stop()
        self.removeObservers()
        if self.logic is not None:
            self.logic.stopLocalWorker()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        if self.logic is None:
            return
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
        """Called just after the scene is closed: a fresh parameter node, and the model list again (the new node
        has no model chosen yet)."""
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.refreshModels()

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

    def _serverToken(self) -> str:
        return self.ui.serverTokenLineEdit.text.strip()

    def onServerTokenEdited(self) -> None:
        """Keep the server token in the application settings (never in the scene), then list the server's models."""
        qt.QSettings().setValue(SERVER_TOKEN_KEY, self._serverToken())
        self.refreshModels()

    def refreshModels(self) -> None:
        """Ask the worker that will segment for its models, on a background thread (starting the worker on this
        computer can take seconds, a server may not answer); ``_showModels`` fills the chooser when it answers."""
        parameters = self._parameterNode
        server = parameters.serverUrl.strip() if parameters else ""
        self._dependenciesReady = bool(server) or not self.logic.missingDependencies()
        combo = self.ui.modelComboBox
        if not self._dependenciesReady:
            self._catalogue = None
            combo.defaultText = _("Press Apply to install TextSeg's dependencies")
            self._setStatus(_("TextSeg needs PyTorch and a few Python packages: press Apply to install them."))
            self._updateGui()
            return
        self._catalogue = TextSegTask(self.logic.modelChoices, server, self._serverToken())
        if combo.count == 0:
            combo.defaultText = _("Reading the model list...")
        if not server and not self.logic.worker().running:
            self._catalogueStatus = _("Starting the TextSeg worker...")
            self._setStatus(self._catalogueStatus)
        self._runTimer.start()

    def _showModels(self, task: TextSegTask) -> None:
        """Fill the model chooser with the catalogue ``task`` read (or say why it could not be read)."""
        parameters = self._parameterNode
        combo = self.ui.modelComboBox
        if task.error is None:
            choices = task.result
            if self._catalogueStatus and self.ui.statusLabel.text == self._catalogueStatus:
                self._setStatus("")
            self._catalogueStatus = ""
        else:
            logging.warning("TextSeg could not read its model catalogue: %s", task.error)
            self._catalogueStatus = _("The model catalogue could not be read: {error}").format(error=task.error)
            self._setStatus(self._catalogueStatus, warning=True)
            choices = []
        self._models = {choice.id: choice for choice in choices}
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for choice in choices:
            combo.addItem(choice.title if choice.title == choice.id else f"{choice.title} ({choice.id})", choice.id)
        if task.error is not None:
            combo.defaultText = _("No models: the catalogue could not be read")
        else:
            combo.defaultText = _("No model installed: use Import...") if not choices else ""
        if parameters and parameters.modelId not in self._models and choices:
            parameters.modelId = choices[0].id
        combo.blockSignals(wasBlocked)
        self._updateGui()

    def _updateGui(self, caller: vtk.vtkObject | None = None, event: int | None = None) -> None:
        """Model chooser and description, terminology preview, Apply button state."""
        parameters = self._parameterNode
        combo = self.ui.modelComboBox
        index = combo.findData(parameters.modelId) if parameters else -1
        if combo.currentIndex != index:
            wasBlocked = combo.blockSignals(True)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)
        choice = self._models.get(parameters.modelId) if parameters else None
        if choice is None:
            self.ui.modelDescriptionLabel.text = ""
        else:
            lines = [choice.description or choice.architecture]
            if choice.example_prompts:
                lines.append(_("For example: {prompt}").format(prompt=choice.example_prompts[0]))
            if choice.text_role:
                lines.append(choice.text_role)
            self.ui.modelDescriptionLabel.text = "\n".join(lines)
        prompt = parameters.prompt.strip() if parameters else ""
        if prompt and self._dependenciesReady:
            self.ui.terminologyLabel.text = _("Terminology: {label}").format(
                label=self.logic.terminologyLabel(prompt))
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
            button.toolTip = _("Stop segmenting; nothing is added to the scene.")
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
        if not parameters or parameters.modelId not in self._models:
            # The chooser shows no model (the catalogue is not read yet, or could not be read): the ID the scene
            # keeps may name a model this worker lacks.
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
        choice = self._models.get(self._parameterNode.modelId) if self._parameterNode else None
        sections = [
            (_("Examples"), list(choice.example_prompts) if choice else []),
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
        """The user picked a model: store its ID; the threshold follows the model's own."""
        if not self._parameterNode:
            return
        from TextSegLib.core.options import THRESHOLD_STEP

        modelId = str(self.ui.modelComboBox.itemData(index) or "") if index >= 0 else ""
        choice = self._models.get(modelId)
        with slicer.util.NodeModify(self._parameterNode):
            self._parameterNode.modelId = modelId
            if choice is not None:
                self._parameterNode.threshold = min(1.0 - THRESHOLD_STEP, max(THRESHOLD_STEP, float(choice.threshold)))

    def onPromptReturnPressed(self) -> None:
        """Return in the prompt box works as Apply."""
        if self.ui.applyButton.enabled and self._run is None:
            self.onApplyButton()

    def onImportModel(self) -> None:
        """Import a checkpoint file into the models folder of the worker on this computer and select it."""
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import a TextSeg model"), "", _("TextSeg checkpoints (*.safetensors)"))
        if not path:
            return
        server = self._parameterNode.serverUrl.strip() if self._parameterNode else ""
        try:
            with slicer.util.WaitCursor():
                if not server:
                    self.logic.ensureDependencies(askConfirmation=True)
                imported = self.logic.importModel(path, server, self._serverToken())
        except Exception as error:
            self._reportFailure(_("The model could not be imported."), error)
            return
        self.refreshModels()
        self._parameterNode.modelId = imported.choice.id
        self._setStatus(_("Imported {model} into {folder}.").format(model=imported.choice.id,
                                                                    folder=imported.path.parent))

    def onApplyButton(self) -> None:
        """Apply: install the dependencies if needed, else start segmenting. Cancel: stop the run."""
        if self._run is not None:
            self._run.cancel()
            self._finishRun()
            return
        if not self._dependenciesReady:
            try:
                with slicer.util.WaitCursor():
                    self.logic.ensureDependencies(askConfirmation=True)
            except Exception as error:
                self._reportFailure(_("TextSeg's dependencies could not be installed."), error)
                return
            self.refreshModels()
            self._setStatus(_("Dependencies installed. Choose a model, type a prompt and press Apply."))
            return
        parameters = self._parameterNode
        try:
            # The inputs are checked and the voxels copied here, on the main thread (MRML); the worker is started
            # and the volume sent on a background thread, which the timer polls.
            run = self.logic.prepareProcessing(
                parameters.inputVolume, parameters.prompt, parameters.modelId,
                segmentName=parameters.segmentName, device=parameters.device, batchSize=parameters.batchSize,
                threshold=parameters.threshold, probability=parameters.probabilityVolume is not None,
                server=parameters.serverUrl, token=self._serverToken(),
            )
        except Exception as error:
            self._reportFailure(_("TextSeg could not start."), error)
            return
        run.startInBackground()
        self._run = run
        self._runOutputs = (parameters.outputSegmentation, parameters.probabilityVolume)
        self._runTimer.start()
        self.ui.progressBar.value = 0
        self.ui.progressBar.maximum = 0  # busy until the worker says how many slices there are
        self.ui.progressBar.show()
        if run.startsWorker:
            self._setStatus(_("Starting the TextSeg worker..."))
        else:
            self._setStatus(_("Sending the volume to {where}...").format(where=run.where))
        self._updateApplyButton()

    def _reportFailure(self, message: str, error: Exception) -> None:
        """One popup and the status line; the error is logged, not raised out of the Qt slot."""
        logging.info("TextSeg: %s", error, exc_info=error)
        slicer.util.errorDisplay(message + "\n\n" + str(error))
        self._setStatus(_("Failed: {error}").format(error=error), warning=True)

    def _onTimer(self) -> None:
        """Timer on the main thread: take the model list when it has been read; show the run's progress and store
        its result when it has finished. Stops itself when there is nothing left to wait for."""
        catalogue = self._catalogue
        if catalogue is not None and catalogue.done:
            self._catalogue = None
            self._showModels(catalogue)
        if self._run is not None:
            self._pollRun()
        if self._run is None and self._catalogue is None:
            self._runTimer.stop()

    def _pollRun(self) -> None:
        """Show the worker's progress; store the result when the run has finished."""
        run = self._run
        wasStarted = run.started
        try:
            finished = run.poll()
        except Exception as error:
            self._finishRun(error)
            return
        if run.started and not wasStarted and not finished:
            self._setStatus(_("Segmenting on {where}...").format(where=run.where))
        done, total = run.progress
        if total:
            self.ui.progressBar.maximum = total
            self.ui.progressBar.value = done
        if finished:
            self._finishRun()

    def _finishRun(self, error: Exception | None = None) -> None:
        """The run ended (finished, cancelled or failed): update the panel and store the result, if any."""
        run, self._run = self._run, None
        self._runTimer.stop()
        self.ui.progressBar.hide()
        self._updateApplyButton()
        segmentationNode, probabilityVolume = self._runOutputs
        self._runOutputs = (None, None)
        if error is None:
            try:
                outcome = self.logic.finishProcessing(run, segmentationNode, probabilityVolume, showResult=False)
            except Exception as failure:
                error = failure
        if error is not None:
            self._reportFailure(_("Segmentation failed; the scene was not changed."), error)
            return
        if outcome is None:
            self._setStatus(_("Cancelled; nothing was added."))
            return
        segmentationNode, segmentId = outcome
        if self._parameterNode:
            self._parameterNode.outputSegmentation = segmentationNode
        self.logic.addRecentPrompt(run.prompt)
        self._recentPrompts.setStringList(self.logic.recentPrompts())
        description, warned = self.logic.describeResult(run, segmentationNode, segmentId)
        self._setStatus(description, warning=warned)
        # Drawn in a later event: building the 3D surface takes as long again as storing the segment.
        qt.QTimer.singleShot(0, lambda: self._showResult(run, segmentationNode, segmentId))

    def _showResult(self, run: TextSegRun, segmentationNode: vtkMRMLSegmentationNode, segmentId: str) -> None:
        """Show the stored segment in the slice views and in 3D; a warning that brings goes to the status line."""
        scene = slicer.mrmlScene
        if not (scene.IsNodePresent(segmentationNode) and scene.IsNodePresent(run.inputVolume)
                and segmentationNode.GetSegmentation().GetSegment(segmentId) is not None):
            return
        warnings = self.logic.showResult(run.inputVolume, segmentationNode, segmentId)
        if warnings:
            run.notes.extend(warnings)
            description, warned = self.logic.describeResult(run, segmentationNode, segmentId)
            self._setStatus(description, warning=warned)


#
# Background run
#


class TextSegTask:
    """One call run on a background thread, for the main thread to poll (``done``, then ``result`` or ``error``).

    Calls that mostly wait on a socket or a process belong here: Slicer's main thread holds Python's GIL while it
    idles in the Qt event loop, so such a thread runs Python only when the main thread lets go of the GIL, at the
    latest when the panel's timer runs Python (``Testing/module/test_slicer_logic.py`` times a run this way). The
    call must not touch Qt widgets or MRML nodes (only the main thread may).
    """

    def __init__(self, function: Callable[..., Any], *arguments: Any) -> None:
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(function, arguments), name="TextSeg", daemon=True)
        self._thread.start()

    def _run(self, function: Callable[..., Any], arguments: tuple) -> None:
        try:
            self.result = function(*arguments)
        except Exception as error:
            self.error = error

    @property
    def done(self) -> bool:
        """True once the call has returned or raised."""
        return not self._thread.is_alive()


class TextSegRun:
    """One segmentation for the worker, and what the scene needs to store its result.

    Console and batch use: :meth:`submit` sends the volume, :meth:`poll` asks the worker how far the job is (a
    quick request), :meth:`wait` polls until it ends. The panel: :meth:`startInBackground` does all the waiting on a
    background thread (sending the volume, asking for the job's state every ``POLL_INTERVAL_MS``, fetching the
    result), and :meth:`poll` only reads what that thread found. :meth:`cancel` returns at once. MRML nodes are
    read before the run starts and written after it ends, by :meth:`TextSegLogic.finishProcessing`.
    """

    def __init__(self, inputVolume: vtkMRMLScalarVolumeNode, prompt: str, segmentName: str, worker: RemoteWorker,
                 volume: Any = None, request: Any = None) -> None:
        self.inputVolume = inputVolume
        self.prompt = prompt
        self.segmentName = segmentName
        self.worker = worker
        self.job = None
        self.progress = (0, 0)
        self.result = None
        self.notes = []  # warnings from showing the result (the result's own are in ``result.notes``)
        # A worker on this computer that is not running yet (a server's client has no ``running``).
        self.startsWorker = not getattr(worker, "running", True)
        self._volume = volume
        self._request = request
        self._background = None
        self._fetched = None
        self._cancelRequested = False
        self._wake = threading.Event()

    @property
    def where(self) -> str:
        """Where the run segments, for the status line."""
        return self.worker.describe()

    @property
    def started(self) -> bool:
        """True once the worker has the volume (the job exists)."""
        return self.job is not None

    @property
    def cancelled(self) -> bool:
        """True once cancel was asked for."""
        return self._cancelRequested or (self.job is not None and self.job.cancelled)

    def submit(self) -> None:
        """Send the volume and the request to the worker (starting a worker on this computer if needed); waits."""
        job = self.worker.submit(self._volume, self._request)
        self._volume = self._request = None
        self.job = job

    def startInBackground(self) -> None:
        """Send the volume, follow the job and fetch its result on a background thread; :meth:`poll` reports."""
        self._background = TextSegTask(self._followInBackground)

    def _followInBackground(self) -> None:
        """The background thread: network requests only (never Qt or MRML)."""
        self.submit()
        while True:
            if self._cancelRequested:
                self.job.cancel()
            status = self.job.status()
            self.progress = (status.done, status.total)
            if status.finished:
                if status.state == "done" and not self._cancelRequested:
                    self._fetched = self.job.result()
                return
            self._wake.wait(POLL_INTERVAL_MS / 1000.0)

    def cancel(self) -> None:
        """Stop the run; the worker is told (from the background thread, if the run has one) and nothing will be
        stored."""
        self._cancelRequested = True
        self._wake.set()
        if self._background is None and self.job is not None:
            self.job.cancel()

    def poll(self) -> bool:
        """True once the run has ended; raises when the worker failed or could not be given the volume. Without a
        background thread this asks the worker how far the job is (a quick request)."""
        background = self._background
        if background is not None:
            if not background.done:
                return False
            if background.error is not None and not self._cancelRequested:
                raise background.error
            return True
        status = self.job.status()
        self.progress = (status.done, status.total)
        return status.finished

    def fetchResult(self) -> Any:
        """The finished job's result (None when it was cancelled); raises the worker's error when it failed."""
        if self.cancelled:
            return None
        if self._fetched is not None:
            return self._fetched
        return self.job.result()

    def wait(self, interval: float = POLL_INTERVAL_MS / 1000.0) -> None:
        """Block until the run has ended (console and batch use)."""
        while not self.poll():
            time.sleep(interval)


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
        """Python packages TextSeg installs with pip: minimum versions, so that other extensions sharing Slicer's
        Python keep theirs where they satisfy ours (torch and torchvision come from the PyTorch extension)."""
        lines = REQUIREMENTS_FILE.read_text().splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]

    @staticmethod
    def _satisfied(requirement: str) -> bool:
        """Whether an installed distribution satisfies ``requirement`` (PEP 440, through ``packaging``)."""
        from packaging.requirements import Requirement

        parsed = Requirement(requirement)
        try:
            installed = importlib.metadata.version(parsed.name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return parsed.specifier.contains(installed, prereleases=True)

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
        reason = unsupportedReason()
        if reason:
            raise RuntimeError(reason)
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
            self._pipInstall(packages)
        importlib.invalidate_caches()
        still = self.missingDependencies()
        if still:
            raise RuntimeError(_("These packages are still missing after installation: {packages}. Restart Slicer "
                                 "and press Apply again.").format(packages=", ".join(still)))

    @staticmethod
    def _pipInstall(packages: list[str]) -> None:
        """pip-install ``packages`` (requirement strings) into Slicer's Python.

        Slicer 5.12 and later: ``slicer.packaging.pip_ensure`` (Base/Python/slicer/packaging.py), which also offers
        a restart when an already imported package was updated; the user was asked already, and tests need the
        packages, so neither its prompt nor its testing-mode skip is used. Slicer 5.10: ``slicer.util.pip_install``.
        """
        logging.info("TextSeg: installing %s", " ".join(packages))
        try:
            from slicer import packaging as slicerPackaging
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None and hasattr(slicerPackaging, "pip_ensure"):
            slicerPackaging.pip_ensure(packages, prompt_install=False, requester="TextSeg", skip_in_testing=False)
        else:
            slicer.util.pip_install(packages)

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
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENTS[0].removeprefix("torch"),
            torchvisionVersionRequirement=TORCH_REQUIREMENTS[1].removeprefix("torchvision"))
        if torch is None:
            raise RuntimeError(_("PyTorch was not installed; TextSeg cannot run without it."))

    # ------------------------------------------------------------------------------------------- catalogue

    @staticmethod
    def worker(server: str = "", token: str = "") -> RemoteWorker:
        """The worker that segments: a TextSeg server at ``server``, or (empty) a worker process on this computer
        run by Slicer's ``PythonSlicer`` (found on PATH as ``slicer.util._executePythonModule`` finds it,
        Base/Python/slicer/util.py). The same worker, with its loaded models, serves every run."""
        from TextSegLib.service.local import shared_worker

        python = None if server else (shutil.which("PythonSlicer") or sys.executable)
        return shared_worker(server.strip() or None, token.strip() or None, python)

    @staticmethod
    def stopLocalWorker() -> None:
        """Stop the worker process on this computer, if one runs (it would also end with Slicer)."""
        from TextSegLib.service.local import stop_local_workers

        stop_local_workers()

    @staticmethod
    def modelChoices(server: str = "", token: str = "") -> list[ModelChoice]:
        """Models the user can pick, as the worker that segments lists them: the worker process on this computer
        (started on first use) lists the shipped and imported models, a server its own."""
        return TextSegLogic.worker(server, token).models()

    @staticmethod
    def importModel(path: str, server: str = "", token: str = "") -> ImportedModel:
        """Check a checkpoint file fully and copy it into the models folder of the worker on this computer (with
        ``textseg import`` in the worker's Python); return the model as the worker lists it and where it went.
        Raises ``WorkerError`` (a ``TextSegError``) with one line when the file is refused, and for a server, which
        cannot be sent models: the line says to run ``textseg import`` there."""
        return TextSegLogic.worker(server, token).import_model(path)

    @staticmethod
    def terminologyLabel(prompt: str) -> str:
        """What the segment for ``prompt`` will be called in Slicer's terminology (e.g. "Mass in Left Lung")."""
        from TextSegLib.io.terminology import terminology_for_prompt

        return terminology_for_prompt(prompt).label

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

    def startProcessing(self, inputVolume: vtkMRMLScalarVolumeNode | None, prompt: str,
                        modelId: str | Sequence[str], segmentName: str = "", device: str = "auto",
                        batchSize: int | None = None, threshold: float | None = None,
                        probability: bool = False, modality: str | None = None, server: str = "",
                        token: str = "") -> TextSegRun:
        """Check the inputs and send the volume to the worker, waiting for it (main thread); poll what it returns.

        Arguments as for :meth:`process`; ``probability`` asks for the probability map, ``server``/``token`` name a
        TextSeg server (empty: a worker process on this computer, started on first use). The volume's voxels are
        copied now, so the run does not read MRML nodes. Raises ValueError on bad input (a ``TypeError`` for a
        prompt that is not text); the prompt and the options are checked before the volume is sent.
        """
        run = self.prepareProcessing(inputVolume, prompt, modelId, segmentName, device, batchSize, threshold,
                                     probability, modality, server, token)
        run.submit()
        return run

    def prepareProcessing(self, inputVolume: vtkMRMLScalarVolumeNode | None, prompt: str,
                          modelId: str | Sequence[str], segmentName: str = "", device: str = "auto",
                          batchSize: int | None = None, threshold: float | None = None,
                          probability: bool = False, modality: str | None = None, server: str = "",
                          token: str = "") -> TextSegRun:
        """The checks and the copy of :meth:`startProcessing` (main thread, quick): a run not yet sent, which
        :meth:`TextSegRun.submit` or :meth:`TextSegRun.startInBackground` sends. Raises as ``startProcessing``
        does, and ``WorkerError`` for a server address that is not one."""
        from TextSegLib.app.mrml import volume_from_node
        from TextSegLib.core.options import SegmentOptions, validate_prompt
        from TextSegLib.service.protocol import SegmentRequest

        reason = unsupportedReason()
        if reason:
            raise RuntimeError(reason)
        prompt = validate_prompt(prompt)
        modelIds = [modelId] if isinstance(modelId, str) else list(modelId)
        if not modelIds or not all(modelIds):
            raise ValueError(_("No model chosen: pick one from the catalogue or import a checkpoint."))
        wanted = DEVICES.get(device, device)
        options = SegmentOptions(device=wanted, batch_size=batchSize or None, threshold=threshold,
                                 probability=probability, modality=modality)
        request = SegmentRequest(prompt, [str(m) for m in modelIds], options).validate()
        volume = volume_from_node(inputVolume, modality)
        worker = self.worker(server, token)
        return TextSegRun(inputVolume, prompt, " ".join(segmentName.split()), worker, volume, request)

    def finishProcessing(self, run: TextSegRun, segmentationNode: vtkMRMLSegmentationNode | None = None,
                         probabilityVolume: vtkMRMLScalarVolumeNode | None = None,
                         showResult: bool = True) -> tuple | None:
        """Store a finished run's result in the scene (main thread); None when it was cancelled.

        ``segmentationNode`` None creates a segmentation named after the volume. Raises the worker's error (a
        ``ValueError`` for refused input). On any error nothing stays in the scene: a segmentation created here is
        removed again (``TextSegLib.app.mrml.store_in_new_or_existing_node``, as the web page stores results).
        Returns ``(segmentationNode, segmentId)``; ``run.notes`` holds the warnings from showing the result.
        """
        from TextSegLib.app.mrml import store_in_new_or_existing_node, update_volume_node

        result = run.result = run.fetchResult()
        if result is None:
            return None
        inputVolume = run.inputVolume
        for node in (inputVolume, segmentationNode, probabilityVolume):
            if node is not None and not slicer.mrmlScene.IsNodePresent(node):
                raise ValueError(_("{name} was removed while TextSeg was running; nothing was added.").format(
                    name=node.GetName()))
        segmentationNode, segmentId = store_in_new_or_existing_node(
            slicer.mrmlScene, inputVolume, segmentationNode, result, run.segmentName or None)
        if probabilityVolume is not None and result.probability is not None:
            update_volume_node(probabilityVolume, result.probability, inputVolume)
            probabilityVolume.CreateDefaultDisplayNodes()
        if showResult:
            run.notes.extend(self.showResult(inputVolume, segmentationNode, segmentId))
        return segmentationNode, segmentId

    @staticmethod
    def showResult(inputVolume: vtkMRMLScalarVolumeNode, segmentationNode: vtkMRMLSegmentationNode,
                   segmentId: str) -> list[str]:
        """Show the segment in the slice views (over the input volume) and in 3D; return warnings for the user."""
        from TextSegLib.app.mrml import show_closed_surface

        segmentationNode.GetDisplayNode().SetSegmentVisibility(segmentId, True)
        warnings = show_closed_surface(segmentationNode)
        if slicer.app.layoutManager() is not None:
            slicer.util.setSliceViewerLayers(background=inputVolume)
        return warnings

    @staticmethod
    def describeResult(run: TextSegRun, segmentationNode: vtkMRMLSegmentationNode,
                       segmentId: str) -> tuple[str, bool]:
        """One line for the status (the segment, its volume, the time, the device, found or not and on what
        evidence, and any warning), and whether it carries a warning: ``TextSegLib.app.mrml.describe_result``, the
        line the web page shows."""
        from TextSegLib.app.mrml import describe_result

        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        return describe_result(run.result, segment.GetName(), run.notes)

    def process(self, inputVolume: vtkMRMLScalarVolumeNode | None,
                segmentationNode: vtkMRMLSegmentationNode | None, prompt: str,
                modelId: str | Sequence[str], segmentName: str | None = None, device: str = "auto",
                batchSize: int | None = None, threshold: float | None = None,
                probabilityVolume: vtkMRMLScalarVolumeNode | None = None, modality: str | None = None,
                showResult: bool = True, server: str = "", token: str = "") -> str:
        """Segment ``inputVolume`` for ``prompt`` and return the ID of the segment added to ``segmentationNode``.

        Runs synchronously (Python console, batch scripts, tests)::

            logic = slicer.util.getModuleLogic("TextSeg")
            segmentId = logic.process(volumeNode, segmentationNode, "the liver", "abdomen-freqmedclip-small")

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
            server: address of a TextSeg server (default: a worker process on this computer).
            token: the server's token.

        Raises:
            ValueError: a missing or empty input, an empty prompt, an unknown model, a bad threshold or batch size.
            TypeError: a prompt that is not text (``str``).
            RuntimeError: the worker failed (for example it ran out of memory); the scene is unchanged.
        """
        if segmentationNode is None:
            raise ValueError(_("No segmentation node: pass the segmentation that should receive the segment."))
        if not server:
            self.ensureDependencies(askConfirmation=True)
        run = self.startProcessing(inputVolume, prompt, modelId, segmentName or "", device, batchSize, threshold,
                                   probabilityVolume is not None, modality, server, token)
        run.wait()
        outcome = self.finishProcessing(run, segmentationNode, probabilityVolume, showResult)
        for note in [*run.result.notes, *run.notes]:
            logging.warning("TextSeg: %s", note)
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
        """The panel, opened as a user opens it, once it has read the model list (on a background thread)."""
        slicer.util.selectModule("TextSeg")
        widget = slicer.util.getModuleWidget("TextSeg")
        deadline = time.monotonic() + 300
        while widget._catalogue is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.02)
        self.assertIsNone(widget._catalogue, "the model list was not read within 300 s")
        return widget

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
        """Apply needs a volume, a model the chooser shows and a prompt (once the dependencies are there)."""
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
        self.assertEqual(widget.ui.applyButton.enabled, parameters.modelId in widget._models)
        self.delayDisplay("Test passed")
