"""``TextSeg/TextSeg.py`` imported as 3D Slicer imports it, on slicer-core's real MRML classes, for the logic tests.

slicer-core ships the MRML classes, ``slicer.util`` and Slicer's volume and segmentation storage, not the application:
the Qt-only parts of Slicer's Python package that TextSeg.py imports (the ``qt`` module, ``slicer.i18n``,
``slicer.parameterNodeWrapper``'s decorators, ``ScriptedLoadableModule``'s base classes and ``slicer.app``) are stood
in, as far as the logic uses them (nothing of their behaviour). ``slicer.mrmlScene`` is a real scene.

Unlike ``testkit`` this module imports neither torch nor the engine, so a fresh interpreter can load the module with
it and check that Slicer's process never loads torch.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import slicer

MODULE = Path(__file__).resolve().parents[1] / "TextSeg"


def _application() -> types.SimpleNamespace:
    """``slicer.app`` as a headless Slicer 5.10 in testing mode answers the calls the logic makes."""
    return types.SimpleNamespace(
        majorVersion=5, minorVersion=10, testingEnabled=lambda: True,
        commandOptions=lambda: types.SimpleNamespace(noMainWindow=True), layoutManager=lambda: None)


def _stand_in_modules() -> dict[str, types.ModuleType]:
    """The Qt-only modules TextSeg.py imports, as far as the logic uses them (nothing of their behaviour)."""
    qt = types.ModuleType("qt")
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")

    class Choice:
        def __init__(self, choices):
            self.choices = choices

    class WithinRange:
        def __init__(self, minimum, maximum):
            self.minimum, self.maximum = minimum, maximum

    wrapper.Choice, wrapper.WithinRange = Choice, WithinRange
    wrapper.parameterNodeWrapper = lambda cls: cls
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    return {"qt": qt, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
            "slicer.ScriptedLoadableModule": scripted}


@contextlib.contextmanager
def textseg_module() -> Iterator[types.ModuleType]:
    """TextSeg.py imported on slicer-core, with ``slicer.mrmlScene`` a real scene and ``slicer.app`` a headless
    Slicer 5.10; ``sys.modules``, ``sys.path`` and the ``slicer`` package are restored afterwards."""
    stand_ins = _stand_in_modules()
    saved = {name: sys.modules.get(name) for name in [*stand_ins, "TextSeg"]}
    sys.modules.update(stand_ins)
    for name, module in stand_ins.items():
        if name.startswith("slicer."):
            setattr(slicer, name.split(".", 1)[1], module)
    slicer.app = _application()
    slicer.mrmlScene = slicer.vtkMRMLScene()
    sys.path.insert(0, str(MODULE))
    try:
        import TextSeg

        yield TextSeg
    finally:
        sys.path.remove(str(MODULE))
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name in ("app", "mrmlScene", "i18n", "parameterNodeWrapper", "ScriptedLoadableModule"):
            if name in vars(slicer):
                delattr(slicer, name)
