"""The parts of the 3D Slicer application that a scripted module reaches through ``slicer``: stand-ins.

``slicer.app`` (versions, testing mode, the module manager, processEvents, the override cursor, translation, the
core IO manager), the main window with its module selector, and a scripted module with its widget representation
(``qSlicerScriptedLoadableModule``, ``qSlicerScriptedLoadableModuleWidget``) as Slicer's C++ builds them around a
module's Python classes: the Python module file is imported, its module class made with the representation as
``parent``, and its widget class's ``setup``/``enter``/``exit`` called when the module is first shown, entered and
left. The IO manager reads volumes with Slicer's own volume storage node (slicer-core).
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import slicer
import vtk
from PySide6 import QtCore, QtWidgets

from qtslicer.qt import PythonQtObject, register, wrapped
from qtslicer.widgets import qMRMLWidget


class ModuleManager(PythonQtObject, QtCore.QObject):
    """The module manager: finds loaded modules and announces a module's unloading."""

    moduleAboutToBeUnloaded = QtCore.Signal(str)
    pythonQtSignals: ClassVar[dict[str, str]] = {"moduleAboutToBeUnloaded(QString)": "moduleAboutToBeUnloaded"}

    def __init__(self) -> None:
        super().__init__()
        self.modules: dict[str, Any] = {}

    def module(self, name: str) -> Any:
        return self.modules.get(name)

    def unloadModule(self, name: str) -> None:
        """As Slicer does when it closes: the module's widget gets ``cleanup()`` through the signal."""
        self.moduleAboutToBeUnloaded.emit(name)
        self.modules.pop(name, None)


@register
class qSlicerScriptedLoadableModuleWidget(qMRMLWidget):
    """A scripted module's widget representation: holds the Python widget object (``self()``)."""

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._python = None
        self._entered = False

    def self(self) -> Any:
        return self._python

    def _getEntered(self) -> bool:
        return self._entered

    isEntered = QtCore.Property(bool, _getEntered)


@register
class qSlicerScriptedLoadableModule(PythonQtObject, QtCore.QObject):
    """A scripted module: its Python file, its module object, and its widget representation made on demand."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.name = path.stem
        self.path = str(path)
        self._representation = None
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        self.pythonModule = importlib.import_module(self.name)
        self.pythonObject = getattr(self.pythonModule, self.name)(self)

    def widgetRepresentation(self) -> qSlicerScriptedLoadableModuleWidget:
        if self._representation is None:
            representation = qSlicerScriptedLoadableModuleWidget()
            representation.setLayout(wrapped(QtWidgets.QVBoxLayout)())
            representation.setMRMLScene(slicer.mrmlScene)
            widget = getattr(self.pythonModule, self.name + "Widget")(representation)
            representation._python = widget
            widget.setup()
            self._representation = representation
        return self._representation

    def logic(self) -> None:
        return None


class ModuleSelector:
    """The main window's module selector: leaving one module and entering another."""

    def __init__(self, manager: ModuleManager) -> None:
        self.manager = manager
        self.selectedModule = ""

    def selectModule(self, name: str) -> None:
        if name == self.selectedModule:
            return
        previous = self.manager.module(self.selectedModule)
        if previous is not None and previous._representation is not None:
            previous._representation._entered = False
            previous._representation.self().exit()
        module = self.manager.module(name)
        if module is None:
            raise RuntimeError(f"Could not find module with name '{name}'")
        representation = module.widgetRepresentation()
        self.selectedModule = name
        representation._entered = True
        representation.self().enter()


@register
class qSlicerMainWindow(PythonQtObject, QtWidgets.QMainWindow):
    def __init__(self, selector: ModuleSelector) -> None:
        super().__init__()
        self.setObjectName("qSlicerMainWindow")
        self._selector = selector

    def moduleSelector(self) -> ModuleSelector:
        return self._selector


class CoreIOManager:
    """Reads volume files (``"VolumeFile"``) with Slicer's volume archetype storage node, as Slicer loads them."""

    def fileType(self, filename: str) -> str:
        return "VolumeFile"

    def loadNodes(self, fileType: str, properties: dict[str, Any], loaded: vtk.vtkCollection,
                  messages: Any = None) -> bool:
        if fileType != "VolumeFile":
            raise NotImplementedError(f"this stand-in reads volumes only, not {fileType}")
        path = Path(properties["fileName"])
        scene = slicer.mrmlScene
        name = properties.get("name") or path.name.split(".")[0]
        kind = "vtkMRMLLabelMapVolumeNode" if properties.get("labelmap") else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(kind, scene.GenerateUniqueName(name))
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            scene.RemoveNode(storage)
            return False
        node.SetAndObserveStorageNodeID(storage.GetID())
        loaded.AddItem(node)
        return True


class Application:
    """``slicer.app``: Slicer 5.10 (Python 3.11+), ``testingEnabled`` as the test sets it."""

    majorVersion = 5
    minorVersion = 10
    applicationName = "Slicer"

    def __init__(self, qapplication: QtWidgets.QApplication, testing: bool) -> None:
        self.qapplication = qapplication
        self.testing = testing
        self.manager = ModuleManager()
        self.selector = ModuleSelector(self.manager)
        self.mainWindow = qSlicerMainWindow(self.selector)
        self.ioManager = CoreIOManager()

    def testingEnabled(self) -> bool:
        return self.testing

    def commandOptions(self) -> types.SimpleNamespace:
        return types.SimpleNamespace(noMainWindow=False)

    def layoutManager(self) -> None:
        """No views: the harness has no slice or 3D views."""
        return None

    def moduleManager(self) -> ModuleManager:
        return self.manager

    def coreIOManager(self) -> CoreIOManager:
        return self.ioManager

    def topLevelWidgets(self) -> list[QtWidgets.QWidget]:
        return [self.mainWindow]

    def processEvents(self) -> None:
        QtWidgets.QApplication.processEvents()

    def setOverrideCursor(self, cursor: Any) -> None:
        QtWidgets.QApplication.setOverrideCursor(cursor)

    def restoreOverrideCursor(self) -> None:
        QtWidgets.QApplication.restoreOverrideCursor()

    def translate(self, context: str, text: str) -> str:
        return QtCore.QCoreApplication.translate(context, text)
