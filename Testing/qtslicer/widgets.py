"""Minimal CTK and qMRML widgets: what ``TextSeg.ui`` declares and ``TextSeg.py`` and Slicer's GUI connectors use.

They are stand-ins, written from what Slicer's code asks of them (not from CTK's or Slicer's C++), and no more:

- ``ctkCollapsibleButton``: a container with ``text`` and ``collapsed`` (collapsing hides its children);
- ``ctkComboBox``: a QComboBox whose ``defaultText`` shows while nothing is chosen;
- ``ctkSliderWidget``: the spin-box half of CTK's slider (``value``, ``minimum``, ``maximum``, ``singleStep``,
  ``decimals``, ``valueChanged(double)``);
- ``ctkMessageBox``: a QMessageBox that, asked to show modally, records its text and answers OK without showing
  (a test has no one to press it);
- ``qMRMLWidget``: a widget with ``setMRMLScene`` and ``mrmlSceneChanged(vtkMRMLScene*)``;
- ``qMRMLNodeComboBox``: lists the scene's nodes of ``nodeTypes`` (kept up to date through the scene's
  NodeAdded/NodeRemoved events), ``currentNode()``/``setCurrentNode()``/``currentNodeChanged(vtkMRMLNode*)``, a
  "None" item when ``noneEnabled``; without it, the first node is chosen when none is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import vtk
from PySide6 import QtCore, QtWidgets

from qtslicer.qt import PythonQtObject, register


@register
class ctkCollapsibleButton(PythonQtObject, QtWidgets.QGroupBox):
    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._collapsed = False

    def _getText(self) -> str:
        return QtWidgets.QGroupBox.title(self)

    def _setText(self, text: str) -> None:
        QtWidgets.QGroupBox.setTitle(self, text)

    def _getCollapsed(self) -> bool:
        return self._collapsed

    def _setCollapsed(self, collapsed: bool) -> None:
        self._collapsed = bool(collapsed)
        for child in self.findChildren(QtWidgets.QWidget, options=QtCore.Qt.FindChildOption.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed)

    text = QtCore.Property(str, _getText, _setText)
    collapsed = QtCore.Property(bool, _getCollapsed, _setCollapsed)


@register
class ctkComboBox(PythonQtObject, QtWidgets.QComboBox):
    def _getDefaultText(self) -> str:
        return QtWidgets.QComboBox.placeholderText(self)

    def _setDefaultText(self, text: str) -> None:
        QtWidgets.QComboBox.setPlaceholderText(self, text)

    defaultText = QtCore.Property(str, _getDefaultText, _setDefaultText)


@register
class ctkSliderWidget(PythonQtObject, QtWidgets.QDoubleSpinBox):
    pass


@register
class ctkMessageBox(PythonQtObject, QtWidgets.QMessageBox):
    shown: ClassVar[list[str]] = []  # the text of every box shown, oldest first

    def exec_(self) -> int:
        ctkMessageBox.shown.append(QtWidgets.QMessageBox.text(self))
        return QtWidgets.QMessageBox.StandardButton.Ok


@register
class qMRMLWidget(PythonQtObject, QtWidgets.QWidget):
    mrmlSceneChanged = QtCore.Signal(object)
    pythonQtSignals: ClassVar[dict[str, str]] = {"mrmlSceneChanged(vtkMRMLScene*)": "mrmlSceneChanged"}

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._scene = None

    def mrmlScene(self) -> Any:
        return self._scene

    def setMRMLScene(self, scene: Any) -> None:
        if scene is not self._scene:
            self._scene = scene
            self.mrmlSceneChanged.emit(scene)


@register
class qMRMLNodeComboBox(PythonQtObject, QtWidgets.QComboBox):
    currentNodeChanged = QtCore.Signal(object)
    pythonQtSignals: ClassVar[dict[str, str]] = {"currentNodeChanged(vtkMRMLNode*)": "currentNodeChanged"}

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._scene = None
        self._observations: list[int] = []
        self._nodeTypes: list[str] = []
        self._noneEnabled = False
        self._showChildNodeTypes = True
        self._noneDisplay = "None"
        self._currentId = ""
        self.currentIndexChanged.connect(self._onIndexChanged)

    def _property(name: str, kind: type | str) -> QtCore.Property:  # noqa: N805 (a helper of the class body)
        def read(self: qMRMLNodeComboBox) -> Any:
            return getattr(self, "_" + name)

        def write(self: qMRMLNodeComboBox, value: Any) -> None:
            setattr(self, "_" + name, list(value) if kind == "QStringList" else value)
            self._refresh()

        return QtCore.Property(kind, read, write)

    nodeTypes = _property("nodeTypes", "QStringList")
    noneEnabled = _property("noneEnabled", bool)
    showChildNodeTypes = _property("showChildNodeTypes", bool)
    noneDisplay = _property("noneDisplay", str)
    # Accepted as the .ui file sets them; adding, removing and renaming nodes from the chooser is not provided.
    addEnabled = QtCore.Property(bool, lambda self: False, lambda self, value: None)
    removeEnabled = QtCore.Property(bool, lambda self: False, lambda self, value: None)
    renameEnabled = QtCore.Property(bool, lambda self: False, lambda self, value: None)
    baseName = QtCore.Property(str, lambda self: "", lambda self, value: None)

    def mrmlScene(self) -> Any:
        return self._scene

    def setMRMLScene(self, scene: Any) -> None:
        if self._scene is not None:
            for tag in self._observations:
                self._scene.RemoveObserver(tag)
        self._scene = scene
        self._observations = [] if scene is None else [
            scene.AddObserver(event, self._onSceneChanged)
            for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent)]
        self._refresh()

    def _onSceneChanged(self, caller: vtk.vtkObject, event: str) -> None:
        self._refresh()

    def _nodes(self) -> list[Any]:
        scene = self._scene
        if scene is None:
            return []
        nodes = []
        for index in range(scene.GetNumberOfNodes()):
            node = scene.GetNthNode(index)
            if node.GetHideFromEditors():
                continue
            if any(node.IsA(kind) if self._showChildNodeTypes else node.GetClassName() == kind
                   for kind in self._nodeTypes):
                nodes.append(node)
        return nodes

    def _refresh(self) -> None:
        nodes = self._nodes()
        ids = [node.GetID() for node in nodes]
        current = self._currentId if self._currentId in ids else ""
        if not current and not self._noneEnabled and ids:
            current = ids[0]
        blocked = self.blockSignals(True)
        QtWidgets.QComboBox.clear(self)
        if self._noneEnabled:
            QtWidgets.QComboBox.addItem(self, self._noneDisplay, "")
        for node in nodes:
            QtWidgets.QComboBox.addItem(self, node.GetName(), node.GetID())
        QtWidgets.QComboBox.setCurrentIndex(self, QtWidgets.QComboBox.findData(self, current) if current or
                                            self._noneEnabled else -1)
        self.blockSignals(blocked)
        self._setCurrentId(current)

    def _onIndexChanged(self, index: int) -> None:
        self._setCurrentId(str(QtWidgets.QComboBox.itemData(self, index) or "") if index >= 0 else "")

    def _setCurrentId(self, nodeId: str) -> None:
        if nodeId != self._currentId:
            self._currentId = nodeId
            self.currentNodeChanged.emit(self.currentNode())

    def currentNode(self) -> Any:
        if not self._currentId or self._scene is None:
            return None
        return self._scene.GetNodeByID(self._currentId)

    def currentNodeID(self) -> str:
        return self._currentId

    def setCurrentNode(self, node: Any) -> None:
        nodeId = node.GetID() if node is not None else ""
        index = QtWidgets.QComboBox.findData(self, nodeId) if nodeId or self._noneEnabled else -1
        if nodeId and index < 0:
            raise ValueError(f"{node.GetName()} is not a node this chooser lists")
        QtWidgets.QComboBox.setCurrentIndex(self, index)
        self._setCurrentId(nodeId)
