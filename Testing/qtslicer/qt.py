"""The ``qt`` module as PythonQt shows Qt to 3D Slicer's Python, built on PySide6.

PythonQt (Slicer's binding) differs from PySide6 where Slicer code relies on it, and only there is this layer its own:

- Qt properties read and write as attributes (``label.text = "..."``, ``combo.currentIndex``), before methods of the
  same name, and ``name`` is the object name;
- signals are connected by signature strings, ``button.connect("clicked(bool)", slot)``; the signature must be one
  the object has (a wrong one raises, where PythonQt would print a warning and never call the slot);
- ``QMenu.addAction`` returns an action of this module, so that it connects and sets properties the same way;
- ``QUiLoader`` builds the widgets of a ``.ui`` file from this module's classes (and the CTK and MRML widgets of
  :mod:`qtslicer.widgets`), with the object names and properties the file gives, and makes the file's
  ``<connections>`` by their signatures.

Every QObject class of QtCore, QtGui and QtWidgets is reached through this module as a subclass with that behaviour
(made on first use, so ``type(widget) is qt.QLineEdit`` holds for the widgets the loader builds); everything else
(enums, ``Qt``, value classes such as ``QColor``) is PySide6's own.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from typing import Any, ClassVar

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

_SIGNATURE = re.compile(r"\s*(\w+)\s*\((.*)\)\s*$")
_PROPERTIES: dict[type, dict[str, QtCore.QMetaProperty]] = {}
_CLASSES: dict[str, type] = {}
_READING: set[tuple[int, str]] = set()  # (object, property) being read (main thread only)


def _properties(cls: type) -> dict[str, QtCore.QMetaProperty]:
    """The Qt properties of ``cls`` by name (cached per class)."""
    found = _PROPERTIES.get(cls)
    if found is None:
        meta = cls.staticMetaObject
        found = {}
        for index in range(meta.propertyCount()):
            prop = meta.property(index)
            found[prop.name()] = prop
        _PROPERTIES[cls] = found
    return found


def normalized(signature: str) -> tuple[str, str]:
    """``"clicked( bool )"`` -> ``("clicked", "clicked(bool)")``; raises ValueError for a malformed signature."""
    match = _SIGNATURE.match(signature)
    if match is None:
        raise ValueError(f"{signature!r} is not a signal signature such as 'clicked(bool)'")
    arguments = ",".join(argument.strip() for argument in match[2].split(",") if argument.strip())
    return match[1], f"{match[1]}({arguments})"


class PythonQtObject:
    """The PythonQt behaviour, mixed in before a PySide6 QObject class."""

    # Signals declared in Python (PySide6 gives them PyObject arguments): the C++ signature -> the signal's name.
    pythonQtSignals: ClassVar[dict[str, str]] = {}

    def __getattribute__(self, name: str) -> Any:
        if name[0] != "_":
            cls = type(self)
            for owner in cls.__mro__:
                # Methods written in Python come first (PySide6 would otherwise give its own ``connect``).
                if not issubclass(owner, PythonQtObject):
                    break
                if name in vars(owner):
                    found = vars(owner)[name]
                    return found.__get__(self, cls) if hasattr(found, "__get__") else found
            prop = _properties(cls).get(name)
            key = (id(self), name)
            if prop is not None and key not in _READING:
                # Reading ``sizeHint`` calls the virtual sizeHint(), for which PySide6 looks up a Python override by
                # this very name: that nested lookup gets the method, not the property again.
                _READING.add(key)
                try:
                    return prop.read(self)
                finally:
                    _READING.discard(key)
            if name == "name":
                return QtCore.QObject.objectName(self)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name[0] != "_":
            for owner in type(self).__mro__:
                if not issubclass(owner, PythonQtObject):
                    break
                if hasattr(vars(owner).get(name), "__set__"):
                    vars(owner)[name].__set__(self, value)
                    return
            prop = _properties(type(self)).get(name)
            if prop is not None:
                if isinstance(value, tuple):
                    value = list(value)
                if not prop.isWritable() or not prop.write(self, value):
                    raise AttributeError(f"{type(self).__name__}.{name} cannot be set to {value!r}")
                return
            if name == "name":
                self.setObjectName(value)
                return
        super().__setattr__(name, value)

    def _signalInstance(self, signature: str) -> QtCore.SignalInstance:
        name, wanted = normalized(signature)
        declared = {normalized(key)[1]: value for key, value in type(self).pythonQtSignals.items()}
        if wanted in declared:
            return getattr(self, declared[wanted])
        meta = self.metaObject()
        for index in range(meta.methodCount()):
            method = meta.method(index)
            if (method.methodType() == QtCore.QMetaMethod.MethodType.Signal
                    and bytes(method.methodSignature().data()).decode() == wanted):
                return getattr(self, name)
        raise AttributeError(f"{type(self).__name__} has no signal {wanted}")

    def connect(self, signature: str, slot: Callable[..., Any]) -> bool:
        """PythonQt's ``object.connect("signal(arguments)", callable)``."""
        self._signalInstance(signature).connect(slot)
        return True

    def disconnect(self, signature: str, slot: Callable[..., Any]) -> bool:
        """PythonQt's ``object.disconnect("signal(arguments)", callable)``."""
        return bool(self._signalInstance(signature).disconnect(slot))


def wrapped(base: type) -> type:
    """The PythonQt-style subclass of the PySide6 QObject class ``base`` (one per class)."""
    cls = _CLASSES.get(base.__name__)
    if cls is None:
        cls = _CLASSES[base.__name__] = type(base.__name__, (PythonQtObject, base), {"__module__": __name__})
    return cls


def register(cls: type) -> type:
    """Make ``cls`` (a PythonQtObject class of its own, e.g. a CTK widget) the class its name stands for."""
    _CLASSES[cls.__name__] = cls
    return cls


@register
class QMenu(PythonQtObject, QtWidgets.QMenu):
    """``addAction(text)`` returns an action of this module, as PythonQt's does."""

    def addAction(self, *arguments: Any) -> QtGui.QAction:
        if len(arguments) == 1 and isinstance(arguments[0], str):
            action = wrapped(QtGui.QAction)(arguments[0], self)
            super().addAction(action)
            return action
        return super().addAction(*arguments)


def _ui_connections(text: bytes) -> tuple[bytes, list[tuple[str, str, str, str]]]:
    """The .ui file without its ``<connections>``, and those as (sender, signal, receiver, slot)."""
    root = ET.fromstring(text)
    found = []
    for connections in root.findall("connections"):
        for item in connections.findall("connection"):
            found.append(tuple(item.findtext(tag) for tag in ("sender", "signal", "receiver", "slot")))
        root.remove(connections)
    return ET.tostring(root), found


@register
class QUiLoader(QtUiTools.QUiLoader):
    """Builds a .ui file's widgets from this module's classes; the file's connections are made by signature."""

    def createWidget(self, className: str, parent: QtWidgets.QWidget | None = None,
                     name: str = "") -> QtWidgets.QWidget:
        cls = _lookup(className)
        if cls is None:
            raise RuntimeError(f"the .ui file uses {className}, which this Qt layer does not provide")
        widget = cls(parent)
        widget.setObjectName(name)
        return widget

    def load(self, device: QtCore.QIODevice, parentWidget: QtWidgets.QWidget | None = None) -> QtWidgets.QWidget:
        if not device.isOpen():
            device.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        text, connections = _ui_connections(bytes(device.readAll().data()))
        buffer = QtCore.QBuffer()
        buffer.setData(QtCore.QByteArray(text))
        buffer.open(QtCore.QIODevice.OpenModeFlag.ReadOnly)
        root = super().load(buffer, parentWidget)
        if root is None:
            raise RuntimeError(f"QUiLoader could not read the file: {self.errorString()}")
        name = QtCore.QObject.objectName
        objects = {name(child): child for child in [root, *root.findChildren(QtCore.QObject)] if name(child)}
        for sender, signal, receiver, slot in connections:
            objects[sender].connect(signal, getattr(objects[receiver], normalized(slot)[0]))
        return root


def _lookup(name: str) -> type | None:
    if name in _CLASSES:
        return _CLASSES[name]
    for module in (QtWidgets, QtGui, QtCore):
        base = getattr(module, name, None)
        if isinstance(base, type) and issubclass(base, QtCore.QObject):
            return wrapped(base)
    return None


def __getattr__(name: str) -> Any:
    cls = _lookup(name)
    if cls is not None:
        return cls
    for module in (QtCore, QtGui, QtWidgets):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module 'qt' has no attribute {name!r}")
