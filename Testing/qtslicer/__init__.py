"""TextSeg's Slicer module under a real Qt event loop, without the Slicer application.

What is Slicer's own code here: ``ScriptedLoadableModule``, ``slicer.i18n`` and ``slicer.parameterNodeWrapper``
(Slicer's v5.10.0 files, read from ``../shared/slicer-python`` and never copied into this repository), slicer-core's
MRML classes and its ``slicer.util``. What stands in: the ``qt`` module (PySide6 with PythonQt's manners,
:mod:`qtslicer.qt`), the few CTK and qMRML widgets the panel uses (:mod:`qtslicer.widgets`), and the application
around a scripted module (:mod:`qtslicer.application`). The platform is Qt's ``offscreen``.

:func:`slicer_application` installs all of it (``sys.modules``, the ``slicer`` package's attributes), loads
``TextSeg/TextSeg.py`` as Slicer loads a scripted module, and takes it all down again afterwards.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODULE_FILE = REPO / "TextSeg" / "TextSeg.py"
SLICER_PYTHON = Path(os.environ.get("TEXTSEG_SLICER_PYTHON", REPO.parent / "shared" / "slicer-python"))
_SLICER_SUBMODULES = ("i18n", "parameterNodeWrapper", "ScriptedLoadableModule")
_SLICER_ATTRIBUTES = ("app", "mrmlScene", "modules", "selfTests", "qMRMLWidget", "qMRMLNodeComboBox",
                      "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget", "qSlicerScriptedLoadableModule",
                      "qSlicerScriptedLoadableModuleWidget", *_SLICER_SUBMODULES)


@dataclass
class Harness:
    """The running application: ``app`` (``slicer.app``), ``module`` (TextSeg as Slicer loaded it) and the
    imported ``TextSeg`` Python module."""

    app: Any
    module: Any
    textseg: types.ModuleType

    def openModule(self) -> Any:
        """Select TextSeg in the module selector, as a user does; return its widget (``TextSegWidget``)."""
        import slicer

        slicer.util.selectModule("TextSeg")
        return slicer.util.getModuleWidget("TextSeg")

    def closeApplication(self) -> None:
        """Unload the module as Slicer does when it closes (the widget's ``cleanup()``)."""
        self.app.moduleManager().unloadModule("TextSeg")


def _qapplication(settings: Path) -> Any:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtWidgets

    application = QtWidgets.QApplication.instance() or QtWidgets.QApplication(["Slicer"])
    QtCore.QCoreApplication.setOrganizationName("TextSegTests")
    QtCore.QCoreApplication.setApplicationName("Slicer")
    QtCore.QSettings.setDefaultFormat(QtCore.QSettings.Format.IniFormat)
    QtCore.QSettings.setPath(QtCore.QSettings.Format.IniFormat, QtCore.QSettings.Scope.UserScope, str(settings))
    return application


@contextlib.contextmanager
def slicer_application(settings: Path, testing: bool = False) -> Iterator[Harness]:
    """Qt, Slicer's Python and the TextSeg module, installed for the duration; ``settings`` is the folder of the
    application settings (``qt.QSettings``); ``testing`` is ``slicer.app.testingEnabled()`` (False: a user's Slicer,
    whose error popups are shown, here recorded by ``ctkMessageBox.shown``)."""
    if not (SLICER_PYTHON / "slicer" / "ScriptedLoadableModule.py").is_file():
        raise FileNotFoundError(f"Slicer's Python files are missing: expected {SLICER_PYTHON} (set "
                                "TEXTSEG_SLICER_PYTHON to the folder)")
    qapplication = _qapplication(settings)
    import slicer

    from qtslicer import ctk, qt
    from qtslicer.application import Application, qSlicerScriptedLoadableModule, qSlicerScriptedLoadableModuleWidget
    from qtslicer.widgets import ctkMessageBox, qMRMLNodeComboBox, qMRMLWidget

    saved_modules = {name: sys.modules.get(name) for name in
                     ["qt", "ctk", "TextSeg", *(f"slicer.{name}" for name in _SLICER_SUBMODULES)]}
    saved_path = list(slicer.__path__)
    for name in saved_modules:
        sys.modules.pop(name, None)
    sys.modules["qt"], sys.modules["ctk"] = qt, ctk
    slicer.__path__.append(str(SLICER_PYTHON / "slicer"))
    application = Application(qapplication, testing)
    slicer.app = application
    slicer.mrmlScene = slicer.vtkMRMLScene()
    slicer.qMRMLWidget, slicer.qMRMLNodeComboBox = qMRMLWidget, qMRMLNodeComboBox
    slicer.qSlicerScriptedLoadableModule = qSlicerScriptedLoadableModule
    slicer.qSlicerScriptedLoadableModuleWidget = qSlicerScriptedLoadableModuleWidget
    for name in ("qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLRangeWidget"):
        setattr(slicer, name, ctk.unprovided(name))
    segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations.SetMRMLScene(slicer.mrmlScene)
    slicer.modules = types.SimpleNamespace(segmentations=types.SimpleNamespace(logic=lambda: segmentations))
    ctkMessageBox.shown.clear()
    module = None
    try:
        module = qSlicerScriptedLoadableModule(MODULE_FILE)
        application.manager.modules["TextSeg"] = module
        slicer.modules.textseg = module
        yield Harness(application, module, module.pythonModule)
    finally:
        if module is not None and "TextSeg" in application.manager.modules:
            application.manager.unloadModule("TextSeg")
        if module is not None and module._representation is not None:
            module._representation.deleteLater()
        application.mainWindow.deleteLater()
        qapplication.processEvents()
        sys.path[:] = [entry for entry in sys.path if entry != str(MODULE_FILE.parent)]
        for name, saved in saved_modules.items():
            if saved is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = saved
        slicer.__path__[:] = saved_path
        for name in _SLICER_ATTRIBUTES:
            if name in vars(slicer):
                delattr(slicer, name)
