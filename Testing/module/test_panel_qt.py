"""The TextSeg panel under a real Qt event loop, clicked and typed into as a user does.

Slicer's own code: ``ScriptedLoadableModule`` (the widget's base class, its module-unloading hook, the self-test
runner), ``slicer.i18n`` and ``slicer.parameterNodeWrapper`` (the real ``connectGui`` binding every widget to the
parameter node), all from ``../shared/slicer-python`` (Slicer v5.10.0); slicer-core's MRML classes, volume storage,
segmentations logic and ``slicer.util`` (``loadUI``, ``childWidgetVariables``, ``errorDisplay``, ``selectModule``,
``getModuleWidget``, ``loadVolume``). TextSeg's own: ``TextSeg/TextSeg.py`` and its ``.ui`` file, and the real
worker process (``textseg serve`` on 127.0.0.1) with the shipped model.

Stand-ins (``Testing/qtslicer``): PythonQt's ``qt`` module (PySide6 with PythonQt's attribute-style properties and
signature-string connections, on Qt's offscreen platform), the CTK/qMRML widgets the .ui file declares, and the
application around a scripted module (``slicer.app``, the module manager and selector, the main window, the IO
manager's volume reader). Error popups go through slicer.util's ``errorDisplay`` to a ``ctkMessageBox`` that records
its text and answers OK without showing. ``slicer.app.testingEnabled()`` is False (a user's Slicer, which shows
popups) except where Slicer's own tests run.

The cases are lung2 (a real chest CT, 512 x 512 x 61) for runs that must be stopped midway, and three of its slices
for runs that must finish, to keep each test to seconds.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import slicer
from PySide6 import QtCore, QtGui, QtTest, QtWidgets
from qtslicer import slicer_application
from qtslicer.widgets import ctkMessageBox

from TextSegLib.evaluation.demo import DEMO_MODEL, demo_case
from TextSegLib.service.local import stop_local_workers

REPO = Path(__file__).resolve().parents[2]
CASE = demo_case("lung2")
PROMPT = "the spinal cord"  # what the shipped model finds in a chest CT (see test_slicer_logic.py)
NON_ASCII_PROMPT = "the spinal cord (moelle épinière, 脊髓)"
SLOW_START_S = 1.5
HANDLER_BUDGET_S = 0.1


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Iterator:
    """Qt, Slicer's Python and the TextSeg module (a user's Slicer: not in testing mode), whose worker runs on a
    ``PythonSlicer`` found on PATH (as in Slicer) that takes 1.5 s to start; every worker process the panel started
    is stopped at the end."""
    wrapper = tmp_path_factory.mktemp("bin") / "PythonSlicer"
    wrapper.write_text(f"#!/bin/sh\nsleep {SLOW_START_S}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    stop_local_workers()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
        with slicer_application(tmp_path_factory.mktemp("settings"), testing=False) as application:
            try:
                yield application
            finally:
                stop_local_workers()


@pytest.fixture
def escaped(monkeypatch) -> list[BaseException]:
    """Exceptions raised out of a Qt slot (PySide6 hands them to ``sys.excepthook``, PythonQt prints them to
    Slicer's Python console with their traceback)."""
    caught: list[BaseException] = []
    monkeypatch.setattr(sys, "excepthook", lambda kind, error, traceback: caught.append(error))
    return caught


@pytest.fixture
def panel(harness, escaped):
    """The panel opened on an empty scene, once it shows the worker's models."""
    slicer.mrmlScene.Clear(0)
    widget = harness.openModule()
    widget.parent.show()
    wait_until(lambda: idle(widget), 300, "the model list to be read")
    ctkMessageBox.shown.clear()
    yield widget
    if widget._run is not None:
        widget._run.cancel()
        wait_until(lambda: widget._run is None or widget._run.poll(), 30, "the run to stop")
    assert not escaped, f"exceptions escaped from Qt slots: {escaped}"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Run the Qt event loop (timers, queued signals) until ``condition()`` holds."""
    loop = QtCore.QEventLoop()
    check = QtCore.QTimer()
    check.setInterval(10)
    check.timeout.connect(lambda: condition() and loop.quit())
    deadline = QtCore.QTimer()
    deadline.setSingleShot(True)
    deadline.timeout.connect(loop.quit)
    check.start()
    deadline.start(int(timeout * 1000))
    if not condition():
        loop.exec()
    check.stop()
    assert condition(), f"waited {timeout} s for {what}"


def idle(widget) -> bool:
    """The panel waits for nothing: its polling timer has stopped (no model list being read, no run)."""
    return not widget._runTimer.isActive()


def load(path: Path) -> slicer.vtkMRMLScalarVolumeNode:
    """A volume loaded as File > Add Data loads it (``slicer.util.loadVolume``)."""
    return slicer.util.loadVolume(str(path))


def slab(tmp_path: Path) -> Path:
    import SimpleITK as sitk

    path = tmp_path / "lung2_slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(CASE["image"]))[:, :, 28:31], str(path))
    return path


def choose(selector, item: str) -> None:
    """Pick the item whose text contains ``item`` in a combo box, as a user does from its list."""
    index = selector.findText(item, QtCore.Qt.MatchFlag.MatchContains)
    assert index >= 0, f"{item!r} is not among {[selector.itemText(i) for i in range(selector.count)]}"
    selector.setCurrentIndex(index)


def type_text(widget, text: str) -> None:
    """Key presses and releases carrying ``text``, one character at a time (QTest's keyClicks takes Latin-1
    only)."""
    for character in text:
        for kind in (QtCore.QEvent.Type.KeyPress, QtCore.QEvent.Type.KeyRelease):
            event = QtGui.QKeyEvent(kind, QtCore.Qt.Key.Key_unknown, QtCore.Qt.KeyboardModifier.NoModifier, character)
            QtWidgets.QApplication.sendEvent(widget, event)


def type_into(line_edit, text: str) -> None:
    """Select what the field holds, type ``text`` over it and press Return."""
    line_edit.setFocus()
    line_edit.selectAll()
    QtTest.QTest.keyClick(line_edit, QtCore.Qt.Key.Key_Delete)
    type_text(line_edit, text)
    QtTest.QTest.keyClick(line_edit, QtCore.Qt.Key.Key_Return)


def click(button) -> None:
    QtTest.QTest.mouseClick(button, QtCore.Qt.MouseButton.LeftButton)


def prepare(widget, volume, prompt: str = PROMPT, batch_size: int = 0) -> None:
    """Choose the volume and the shipped model, the CPU and a batch size, and type the prompt."""
    ui = widget.ui
    choose(ui.inputVolumeSelector, volume.GetName())
    choose(ui.modelComboBox, f"({DEMO_MODEL})")
    choose(ui.deviceComboBox, "CPU")
    ui.batchSizeSpinBox.value = batch_size
    ui.promptLineEdit.setFocus()
    ui.promptLineEdit.selectAll()
    type_text(ui.promptLineEdit, prompt)


def node_ids() -> list[str]:
    scene = slicer.mrmlScene
    return [scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())]


def segment_names(node) -> list[str]:
    segmentation = node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def wait_for_progress(widget) -> None:
    wait_until(lambda: widget.ui.progressBar.value > 0 or widget._run is None, 300, "the first slices")
    assert widget._run is not None, f"the run ended before it could be stopped: {widget.ui.statusLabel.text}"


ISOLATED = "TEXTSEG_PANEL_BUDGET_ALONE"  # set in the process that measures the 100 ms budget


class Stopwatch:
    """The longest time the main thread stayed away from the event loop: the longest gap of a 10 ms QTimer while the
    test waits in the loop (:meth:`wait`: the panel's timer, queued signals), and the longest single user action
    (:meth:`act`: a key press or click, whose handlers Qt runs before it returns)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.what = ""
        self._last = 0.0
        self._timer = QtCore.QTimer()
        self._timer.setInterval(10)
        self._timer.timeout.connect(self._tick)

    def _note(self, seconds: float, what: str) -> None:
        if seconds > self.longest:
            self.longest, self.what = seconds, what

    def _tick(self) -> None:
        now = time.perf_counter()
        self._note(now - self._last, "an event the loop handled")
        self._last = now

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        self._last = time.perf_counter()
        self._timer.start()
        try:
            wait_until(condition, timeout, what)
        finally:
            self._timer.stop()
        self._tick()

    def act(self, action: Callable[[], object], what: str) -> None:
        started = time.perf_counter()
        action()
        self._note(time.perf_counter() - started, what)


def test_the_panel_answers_within_100_ms_while_a_slow_worker_starts(harness, escaped, tmp_path):
    """First in this file: the module opens with no worker running, and the worker's Python takes 1.5 s to start.
    The panel says "Starting the TextSeg worker..." at once and reads the model list in the background; then the
    volume and the prompt are chosen and Apply segments to the end. Nothing keeps the main thread from its event
    loop for more than 100 ms: no key press or click (timed one by one), and nothing the loop runs while the test
    waits in it (the longest gap of a 10 ms QTimer).

    Slicer's: connectGui, MRML. Stand-ins: the qt layer (Qt's own event loop and QTimer), the ``PythonSlicer``
    wrapper. PySide6's event loop releases the GIL while it waits, PythonQt's does not: in Slicer the background
    thread runs when it is not waiting on a socket or the worker, at the latest on each of the panel's timer ticks
    (``test_slicer_logic.py`` checks that path with a main thread holding the GIL)."""
    # Measured in a process of its own. After the suite's 760 earlier tests this process holds their objects and
    # threads, and pauses that are theirs fell into the window in the clean-clone CI (gaps of 571 and 1237 ms; full
    # garbage collections of those objects alone took up to 450 ms), while the test passed on its own every time.
    # The budget is the panel's, as in Slicer's main thread, so the process that measures it starts clean.
    if os.environ.get(ISOLATED) != "1":
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"{Path(__file__)}::test_the_panel_answers_within_100_ms_while_a_slow_worker_starts"],
                              capture_output=True, encoding="utf-8", errors="replace", timeout=600,
                              env={**os.environ, ISOLATED: "1"}, cwd=Path(__file__).resolve().parents[2])
        assert done.returncode == 0 and "1 passed" in done.stdout, done.stdout[-4000:] + done.stderr[-2000:]
        return
    _answer_within_budget(harness, escaped, tmp_path)


def _answer_within_budget(harness, escaped, tmp_path) -> None:
    volume = load(slab(tmp_path))
    panel = harness.openModule()
    ui = panel.ui
    assert ui.statusLabel.text == "Starting the TextSeg worker..."
    assert panel._catalogue is not None and not ui.applyButton.enabled
    watch = Stopwatch()
    watch.wait(lambda: idle(panel), 300, "the model list")
    assert ui.statusLabel.text == "" and panel.logic.worker().python.endswith("PythonSlicer")
    watch.act(lambda: choose(ui.inputVolumeSelector, volume.GetName()), "choosing the volume")
    ui.promptLineEdit.setFocus()
    for character in PROMPT:
        watch.act(lambda character=character: type_text(ui.promptLineEdit, character), "a key press")
    watch.act(lambda: click(ui.applyButton), "the click on Apply")
    assert ui.applyButton.text == "Cancel", ui.statusLabel.text
    watch.wait(lambda: panel._run is None, 300, "the run to finish")
    assert segment_names(ui.outputSegmentationSelector.currentNode()) == [PROMPT], ui.statusLabel.text
    assert watch.longest < HANDLER_BUDGET_S, f"{watch.what} took {watch.longest * 1000:.0f} ms"
    assert not escaped


def test_apply_segments_the_volume_and_a_rerun_replaces_its_own_segment(panel, tmp_path):
    """Volume, model and prompt chosen and typed; Apply; the timer polls the worker to the end; the segment is in
    the scene, named after the prompt, in a segmentation the panel made and now selects. Apply again with another
    threshold: the same segment is replaced, a segment the user drew is left alone.

    Slicer's: connectGui (every widget to the parameter node), MRML, the volume storage node. Stand-ins: the qt layer,
    qMRMLNodeComboBox, ctkComboBox, ctkSliderWidget, the module selector and IO manager."""
    volume = load(slab(tmp_path))
    ui = panel.ui
    prepare(panel, volume)
    assert ui.applyButton.enabled and ui.terminologyLabel.text.startswith("Terminology:")
    click(ui.applyButton)
    assert ui.applyButton.text == "Cancel" and not ui.inputsCollapsibleButton.enabled
    wait_until(lambda: panel._run is None, 300, "the run to finish")
    segmentation = ui.outputSegmentationSelector.currentNode()
    assert segmentation is not None and segment_names(segmentation) == [PROMPT], ui.statusLabel.text
    assert ui.statusLabel.text.startswith(PROMPT) and ui.applyButton.text == "Apply"
    first = segmentation.GetSegmentation().GetNthSegmentID(0)

    user = segmentation.GetSegmentation().AddEmptySegment("", "my segment")
    ui.thresholdSliderWidget.value = 0.7
    click(ui.applyButton)
    wait_until(lambda: panel._run is None, 300, "the second run to finish")
    assert segment_names(segmentation) == [PROMPT, "my segment"]
    assert segmentation.GetSegmentation().GetNthSegmentID(0) == first and user
    assert ctkMessageBox.shown == []


def test_cancel_mid_run_leaves_the_scene_unchanged(panel):
    """Apply on lung2 one slice at a time; Cancel once slices are done: at once, nothing added.

    Slicer's: connectGui, MRML. Stand-ins: the qt layer, qMRMLNodeComboBox, ctkCollapsibleButton."""
    volume = load(CASE["image"])
    prepare(panel, volume, batch_size=1)
    before = node_ids()
    click(panel.ui.applyButton)
    wait_for_progress(panel)
    started = time.monotonic()
    click(panel.ui.applyButton)
    assert panel._run is None and time.monotonic() - started < 2.0
    assert panel.ui.statusLabel.text == "Cancelled; nothing was added."
    assert panel.ui.applyButton.text == "Apply" and panel.ui.inputsCollapsibleButton.enabled
    assert node_ids() == before


def test_empty_and_punctuation_prompts_are_refused_and_a_non_ascii_prompt_runs(panel, harness, tmp_path):
    """No prompt: Apply is disabled and Return does nothing. Only punctuation: one popup and the status line say
    so, nothing escapes the slot, the scene is unchanged. A prompt in three scripts segments and names the segment
    after itself, and is kept among the recent prompts (application settings).

    Slicer's: connectGui, ``slicer.util.errorDisplay`` and ``messageBox`` (the popup), MRML. Stand-ins: the qt layer
    (QSettings is Qt's own, in a temporary folder), ctkMessageBox (records instead of showing)."""
    volume = load(slab(tmp_path))
    ui = panel.ui
    prepare(panel, volume, prompt="")
    assert not ui.applyButton.enabled and "a prompt" in ui.applyButton.toolTip
    QtTest.QTest.keyClick(ui.promptLineEdit, QtCore.Qt.Key.Key_Return)
    assert panel._run is None

    before = node_ids()
    type_text(ui.promptLineEdit, "?! ...")
    QtTest.QTest.keyClick(ui.promptLineEdit, QtCore.Qt.Key.Key_Return)
    assert panel._run is None and node_ids() == before
    (popup,) = ctkMessageBox.shown
    assert popup.startswith("TextSeg could not start.") and "has no words" in popup
    assert ui.statusLabel.text.startswith("Failed: The prompt '?! ...' has no words")

    type_into(ui.promptLineEdit, NON_ASCII_PROMPT)  # Return starts it
    assert panel._run is not None
    wait_until(lambda: panel._run is None, 300, "the run to finish")
    segmentation = ui.outputSegmentationSelector.currentNode()
    assert segment_names(segmentation) == [NON_ASCII_PROMPT], ui.statusLabel.text
    assert harness.textseg.TextSegLogic.recentPrompts()[0] == NON_ASCII_PROMPT


BAD_ADDRESSES = ["gpu-server:8765", "http://127.0.0.1:9"]


def enter_server(widget, address: str) -> None:
    widget.ui.advancedCollapsibleButton.collapsed = False
    type_into(widget.ui.serverLineEdit, address)
    wait_until(lambda: idle(widget), 300, "the model list")


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_a_bad_server_address_shows_no_model_and_disables_apply(panel, escaped, address):
    """A server address without a scheme, and one where nothing listens: the chooser shows no model and Apply is
    disabled (it was enabled with the model the scene kept); the status line says why, without a popup.

    Slicer's: connectGui (the server field), ``slicer.util.errorDisplay``. Stand-ins: the qt layer, ctkComboBox,
    ctkMessageBox."""
    ui = panel.ui
    volume = load(CASE["image"])
    prepare(panel, volume)
    assert ui.applyButton.enabled
    enter_server(panel, address)
    assert ui.modelComboBox.count == 0 and ui.modelComboBox.currentText == ""
    assert not ui.applyButton.enabled and "a model" in ui.applyButton.toolTip
    assert ui.statusLabel.text.startswith("The model catalogue could not be read:")
    assert ("must start with http://" if "://" not in address else "Cannot reach") in ui.statusLabel.text
    assert ctkMessageBox.shown == [] and not escaped


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_the_catalogue_warning_goes_when_the_models_come_back(panel, address):
    """After a bad server address, emptying the field brings the worker's models back, and the orange "could not be
    read" line goes with the problem.

    Slicer's: connectGui (the server field). Stand-ins: the qt layer, ctkComboBox."""
    enter_server(panel, address)
    assert panel.ui.statusLabel.text.startswith("The model catalogue could not be read:")
    enter_server(panel, "")
    assert panel.ui.modelComboBox.currentText.endswith(f"({DEMO_MODEL})")
    assert panel.ui.statusLabel.text == ""


def test_closing_the_scene_keeps_the_model(panel, tmp_path):
    """After File > Close Scene the fresh parameter node gets the worker's first model again: loading a volume and
    typing a prompt is enough for Apply.

    Slicer's: the scene's close events (MRML), ``ScriptedLoadableModuleLogic.getParameterNode``, connectGui. Stand-ins:
    the qt layer, qMRMLNodeComboBox (follows the scene's node events), the module selector (``isEntered``)."""
    volume = load(slab(tmp_path))
    prepare(panel, volume)
    slicer.mrmlScene.Clear(0)
    wait_until(lambda: idle(panel), 300, "the model list")
    assert panel._parameterNode.modelId == DEMO_MODEL
    assert panel.ui.modelComboBox.currentText.endswith(f"({DEMO_MODEL})")
    volume = load(slab(tmp_path))
    panel.ui.promptLineEdit.setFocus()
    type_text(panel.ui.promptLineEdit, PROMPT)
    assert panel.ui.inputVolumeSelector.currentNode() is volume
    assert panel.ui.applyButton.enabled, panel.ui.applyButton.toolTip


def test_closing_the_scene_mid_run_cancels_it(panel):
    """File > Close Scene while the worker segments: the run is cancelled, nothing is added to the new scene, and
    the panel is ready again with the model chosen.

    Slicer's: the scene's close events (MRML), connectGui. Stand-ins: the qt layer, qMRMLNodeComboBox."""
    volume = load(CASE["image"])
    prepare(panel, volume, batch_size=1)
    click(panel.ui.applyButton)
    wait_for_progress(panel)
    slicer.mrmlScene.Clear(0)
    wait_until(lambda: idle(panel), 30, "the run to end")
    assert panel.ui.statusLabel.text == "Cancelled; nothing was added."
    assert slicer.mrmlScene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    assert panel._parameterNode.modelId == DEMO_MODEL


class Forwarder(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 that passes every request to ``target`` and its answer back: the panel's own
    worker process, reached as a server at another address, which can then go away while the worker stays."""

    def __init__(self, target: str) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.forward()

            def do_POST(self) -> None:
                self.forward()

            def forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                headers = {name: self.headers[name] for name in ("Authorization", "Content-Type") if self.headers[name]}
                request = urllib.request.Request(target + self.path, data=self.rfile.read(length) if length else None,
                                                 method=self.command, headers=headers)
                try:
                    with urllib.request.urlopen(request, timeout=300) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *arguments: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def test_a_server_that_goes_away_gives_one_popup_and_the_status_line(panel, escaped, tmp_path):
    """A TextSeg server (the real worker behind a forwarding address, reached with its token) lists its models; the
    address stops answering before Apply: one popup and the status line say it cannot be reached, nothing escapes
    the slot, the scene is unchanged and Apply is Apply again.

    Slicer's: connectGui, ``slicer.util.errorDisplay``, MRML. Stand-ins: the qt layer, ctkMessageBox."""
    worker = panel.logic.worker()
    server = Forwarder(worker.url)
    ui = panel.ui
    volume = load(slab(tmp_path))
    prepare(panel, volume)
    ui.advancedCollapsibleButton.collapsed = False
    type_into(ui.serverTokenLineEdit, worker.token)
    enter_server(panel, server.url)
    assert ui.applyButton.enabled, ui.statusLabel.text
    server.stop()
    before = node_ids()
    click(ui.applyButton)
    wait_until(lambda: panel._run is None, 60, "the run to fail")
    (popup,) = ctkMessageBox.shown
    assert popup.startswith("Segmentation failed; the scene was not changed.") and "Cannot reach" in popup
    assert ui.statusLabel.text.startswith(f"Failed: Cannot reach the TextSeg server at {server.url}")
    assert node_ids() == before and ui.applyButton.text == "Apply" and not escaped
    type_into(ui.serverTokenLineEdit, "")
    enter_server(panel, "")


@pytest.mark.slow  # TextSegLogicTest segments the whole of lung2 three times and loads the model in this process
def test_slicers_own_tests_of_the_module_pass_here(harness, escaped, monkeypatch):
    """``TextSegTest`` (TextSeg.py) and ``TextSegLogicTest`` (TextSeg/Testing/Python), as ctest runs them in Slicer's
    testing mode: written for the real application, run here so that they have run somewhere.

    Slicer's: ``ScriptedLoadableModule.runTest`` and ``ScriptedLoadableModuleTest``, connectGui, MRML, the
    segmentations logic, ``slicer.util`` (``loadVolume``, ``arrayFromSegmentBinaryLabelmap``, ``selectModule``).
    Stand-ins: the qt layer, the CTK/qMRML widgets, the module selector, the IO manager."""
    monkeypatch.setattr(harness.app, "testing", True)
    slicer.selfTests["TextSeg"](msec=0)
    monkeypatch.syspath_prepend(str(REPO / "TextSeg" / "Testing" / "Python"))
    from TextSegLogicTest import TextSegLogicTest

    TextSegLogicTest().runTest()
    assert not escaped


def test_closing_slicer_cancels_the_run_and_ends_the_worker(harness, escaped):
    """Slicer closing unloads the module: ``cleanup()`` cancels the run, stops the timer and the worker process on
    this computer exits. (Last in this file: the module is gone afterwards.)

    Slicer's: ``ScriptedLoadableModuleWidget``'s unloading hook (``moduleAboutToBeUnloaded``). Stand-ins: the module
    manager that emits it, the qt layer."""
    slicer.mrmlScene.Clear(0)
    widget = harness.openModule()
    wait_until(lambda: idle(widget), 300, "the model list")
    volume = load(CASE["image"])
    prepare(widget, volume, batch_size=1)
    before = node_ids()
    click(widget.ui.applyButton)
    wait_for_progress(widget)
    run = widget._run
    worker = run.worker
    pid = worker.pid
    harness.closeApplication()
    assert run.cancelled and not widget._runTimer.isActive() and not worker.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    QtWidgets.QApplication.processEvents()
    assert node_ids() == before and not escaped
