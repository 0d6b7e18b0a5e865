"""The Slicer module's files agree with each other and with Slicer's own rules, without the Slicer application.

- ``TextSeg.ui`` and ``TextSeg.py``: every widget the code reaches exists with the class its name promises, every
  parameter-node field is bound to exactly one widget, and the connector Slicer picks for that widget and type
  (by Slicer's own order and rules, ``guiConnectors.py``) accepts it; every connected slot exists;
- ``TextSeg.py`` (and the module's other Python files) compile, ``TextSeg.py`` parses on Python 3.9 (so that Slicer
  5.8 and older can show which Slicer TextSeg needs) and imports nothing heavy at module level;
- the module's CMake lists every file under ``TextSeg/Resources`` and registers the tests; the extension's CMake
  carries the metadata and packages TextSegLib; the icons are 128 x 128;
- the packages the module pip-installs are minimum versions that pyproject.toml's pins satisfy;
- the headless script hands its command line to ``textseg segment`` and exits with its exit code.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "TextSeg"
SOURCE = MODULE / "TextSeg.py"
UI_FILE = MODULE / "Resources" / "UI" / "TextSeg.ui"

# Widget names promise their class (the longest matching suffix wins).
NAMING = {
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "MenuButton": {"QToolButton"},
    "Button": {"QPushButton"},
    "Selector": {"qMRMLNodeComboBox"},
    "ComboBox": {"QComboBox", "ctkComboBox"},
    "LineEdit": {"QLineEdit"},
    "SpinBox": {"QSpinBox"},
    "SliderWidget": {"ctkSliderWidget"},
    "Label": {"QLabel"},
    "ProgressBar": {"QProgressBar"},
}
# Light modules TextSeg.py may import when Slicer loads it (torch and TextSegLib come later, lazily).
LIGHT_IMPORTS = {"__future__", "importlib", "logging", "math", "shutil", "sys", "threading", "time", "collections",
                 "pathlib", "typing", "qt", "slicer", "vtk"}
# pyproject.toml dependencies the module does not pip-install: torch and torchvision come from the PyTorch
# extension, numpy and SimpleITK are part of Slicer.
NOT_PIP_INSTALLED = {"torch", "torchvision", "numpy", "SimpleITK"}


def expected_classes(name: str) -> set[str]:
    suffixes = [suffix for suffix in NAMING if name.lower().endswith(suffix.lower())]
    assert suffixes, f"the widget name {name!r} does not say what it is ({', '.join(NAMING)})"
    return NAMING[max(suffixes, key=len)]


@pytest.fixture(scope="module")
def tree() -> ast.Module:
    return ast.parse(SOURCE.read_text(), str(SOURCE))


@pytest.fixture(scope="module")
def ui() -> dict[str, dict]:
    """Widgets of the .ui file: name -> {"class", "properties"} (properties as text or string lists)."""
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for element in root.iter("widget"):
        properties = {}
        for prop in element.findall("property"):
            value = prop[0]
            properties[prop.get("name")] = ([item.text for item in value] if value.tag == "stringlist"
                                            else value.text)
        widgets[element.get("name")] = {"class": element.get("class"), "properties": properties}
    return widgets


def class_node(tree: ast.Module, name: str) -> ast.ClassDef:
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == name)


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Fields of the @parameterNodeWrapper class: name -> annotation source."""
    (wrapper,) = [node for node in tree.body if isinstance(node, ast.ClassDef)
                  and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)]
    return {node.target.id: ast.unparse(node.annotation) for node in wrapper.body if isinstance(node, ast.AnnAssign)}


def ui_names_used(tree: ast.Module) -> set[str]:
    """Names reached as ``<something>.ui.<name>`` or ``ui.<name>`` anywhere in TextSeg.py."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "ui") or \
                    (isinstance(owner, ast.Name) and owner.id == "ui"):
                names.add(node.attr)
    return names


def test_every_widget_the_code_reaches_exists_with_the_class_its_name_promises(tree, ui):
    used = ui_names_used(tree)
    assert {"applyButton", "progressBar", "statusLabel", "modelComboBox", "promptLineEdit"} <= used
    missing = sorted(used - set(ui))
    assert not missing, f"TextSeg.py uses widgets that TextSeg.ui lacks: {missing}"
    for name in used:
        assert ui[name]["class"] in expected_classes(name), (name, ui[name]["class"])
    for name, widget in ui.items():
        if name != "TextSeg":
            assert widget["class"] in expected_classes(name), (name, widget["class"])


# Slicer's GUI connectors in the order Slicer registers them, read from
# Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (identical at v5.10.0, v5.12.3 and master): the widget
# classes and value types each one's canRepresent() accepts, and what its create() then demands of the annotation.
# connectGui() takes the first connector whose canRepresent() is true (connectors a module registers come after
# these), so a widget/type pair that an earlier connector claims never reaches a later one.
SLICER_CONNECTORS = (
    ("QCheckBoxToBoolConnector", {"QCheckBox", "ctkCheckBox"}, {"bool"}, None),
    ("QCheckablePushButtonToBoolConnector", {"QPushButton"}, {"bool"}, None),
    ("ctkCheckablePushButtonToBoolConnector", {"ctkCheckablePushButton"}, {"bool"}, None),
    ("QSliderOrSpinBoxToIntConnector", {"QSlider", "QSpinBox"}, {"int"}, "bounded"),
    ("QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector",
     {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
      "qMRMLSpinBox"}, {"float", "int"}, "bounded"),
    ("QComboBoxToStringableConnector", {"QComboBox", "ctkComboBox"}, {"int", "float", "str", "bool"}, "Choice"),
    ("QLineEditToStrConnector", {"QLineEdit"}, {"str"}, None),
    ("QLabelToStrConnector", {"QLabel"}, {"str"}, None),
    ("QTextEditPlainTextToStrConnector", {"QTextEdit"}, {"str"}, None),
    ("qMRMLNodeComboBoxToNodeConnector", {"qMRMLNodeComboBox"}, {"node"}, None),
)
# Widgets whose connector raises in its constructor when the value is unbounded.
NEEDS_BOUNDS = {"QSlider", "ctkSliderWidget", "qMRMLSliderWidget"}


def slicer_connector(widget_class: str, annotation: str) -> str:
    """The connector Slicer creates for a widget bound to a field annotated ``annotation``; raises AssertionError
    with Slicer's reason where Slicer's connectGui() would raise."""
    base = re.match(r"(?:Annotated\[)?(\w+)", annotation).group(1)
    kind = "node" if base.startswith("vtkMRML") else base
    for name, widgets, types, demands in SLICER_CONNECTORS:
        if widget_class in widgets and kind in types:
            if demands == "Choice":
                assert "Choice(" in annotation, f"{name} requires the Choice annotation to be used"
            if demands == "bounded" and widget_class in NEEDS_BOUNDS:
                assert "WithinRange(" in annotation, f"{name}: a {widget_class} needs a bounded {base}"
            return name
    raise AssertionError(f"Unable to create GUI connector from {annotation} to {widget_class}")


def test_slicer_would_refuse_the_binding_that_broke_the_panel():
    """The model chooser as it was bound (a ctkComboBox for a plain str) fails in Slicer's create()."""
    with pytest.raises(AssertionError, match="requires the Choice annotation"):
        slicer_connector("ctkComboBox", "str")
    with pytest.raises(AssertionError, match="needs a bounded float"):
        slicer_connector("ctkSliderWidget", "float")
    assert slicer_connector("QComboBox", "Annotated[str, Choice(list(DEVICES))]") == "QComboBoxToStringableConnector"


def test_every_parameter_is_bound_once_and_slicer_picks_a_connector_that_accepts_it(tree, ui):
    fields = parameter_fields(tree)
    assert set(fields) == {"inputVolume", "modelId", "prompt", "segmentName", "outputSegmentation", "device",
                           "batchSize", "threshold", "probabilityVolume", "serverUrl"}
    bound: dict[str, list[str]] = {}
    for name, widget in ui.items():
        parameter = widget["properties"].get("SlicerParameterName")
        if parameter is not None:
            bound.setdefault(parameter, []).append(name)
    by_hand = {"modelId"}  # see test_the_model_chooser_is_bound_by_hand
    assert set(bound) == set(fields) - by_hand, "every field bound, and no widget bound to a field that does not exist"
    chosen = {}
    for field, annotation in fields.items():
        if field in by_hand:
            continue
        assert len(bound[field]) == 1, f"{field} is bound to {bound[field]}"
        widget = ui[bound[field][0]]
        chosen[field] = slicer_connector(widget["class"], annotation)
        if annotation.startswith("vtkMRML"):
            assert widget["properties"]["nodeTypes"] == [annotation], field
    assert chosen["device"] == "QComboBoxToStringableConnector"
    assert chosen["threshold"] == "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector"
    assert chosen["serverUrl"] == chosen["prompt"] == "QLineEditToStrConnector"
    assert ui["batchSizeSpinBox"]["properties"]["specialValueText"] == "automatic"


def test_the_model_chooser_is_bound_by_hand(tree, ui):
    """Its items show names and carry catalogue IDs: no Slicer connector reads item data, so no
    SlicerParameterName; the widget writes the ID into the parameter node and reads it back."""
    assert ui["modelComboBox"]["class"] == "ctkComboBox"
    assert "SlicerParameterName" not in ui["modelComboBox"]["properties"]
    source = ast.unparse(class_node(tree, "TextSegWidget"))
    assert "self.ui.modelComboBox.connect('currentIndexChanged(int)', self.onModelChosen)" in source
    assert "self._parameterNode.modelId = modelId" in source
    assert "combo.findData(parameters.modelId)" in source


def test_connected_slots_exist_and_the_ui_file_is_the_one_loaded(tree):
    widget = class_node(tree, "TextSegWidget")
    methods = {node.name for node in widget.body if isinstance(node, ast.FunctionDef)}
    slots = []
    for node in ast.walk(widget):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect":
            target = node.args[-1]
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                slots.append(target.attr)
    assert slots and set(slots) <= methods, set(slots) - methods
    loaded = [node.args[0].value for node in ast.walk(widget) if isinstance(node, ast.Call)
              and ast.unparse(node.func) == "self.resourcePath"]
    assert [MODULE / "Resources" / path for path in loaded] == [UI_FILE]


def test_the_module_follows_the_template_and_imports_nothing_heavy(tree):
    classes = {node.name: [ast.unparse(base) for base in node.bases]
               for node in tree.body if isinstance(node, ast.ClassDef)}
    assert classes["TextSeg"] == ["ScriptedLoadableModule"]
    assert classes["TextSegWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes["TextSegLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["TextSegTest"] == ["ScriptedLoadableModuleTest"]
    top_level = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module.split(".")[0])
    assert top_level <= LIGHT_IMPORTS, top_level - LIGHT_IMPORTS
    process = next(node for node in class_node(tree, "TextSegLogic").body
                   if isinstance(node, ast.FunctionDef) and node.name == "process")
    arguments = [argument.arg for argument in process.args.args]
    assert arguments[:5] == ["self", "inputVolume", "segmentationNode", "prompt", "modelId"]
    assert "logic.process(volumeNode, segmentationNode" in ast.get_docstring(process)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO) for p in MODULE.rglob("*.py")), ids=str)
def test_the_module_files_compile(path):
    compile((REPO / path).read_text(), str(path), "exec")


def test_the_module_parses_on_the_python_of_older_slicers():
    """Slicer 5.8 ships Python 3.9: TextSeg.py must load there to say which Slicer it needs."""
    ast.parse(SOURCE.read_text(), str(SOURCE), feature_version=(3, 9))
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


# ---------------------------------------------------------------------------------------------------- CMake


def cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} is not set"
    return match.group(1).split()


def test_the_module_cmake_lists_every_resource_and_registers_the_tests():
    text = (MODULE / "CMakeLists.txt").read_text()
    name = cmake_list(text, "MODULE_NAME")[0]
    assert name == "TextSeg"
    resources = {item.replace("${MODULE_NAME}", name) for item in cmake_list(text, "MODULE_PYTHON_RESOURCES")}
    present = {str(p.relative_to(MODULE)) for p in (MODULE / "Resources").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert resources == present
    scripts = {item.replace("${MODULE_NAME}", name) for item in cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    assert scripts == {p.name for p in MODULE.glob("*.py")}
    assert re.search(r"slicerMacroBuildScriptedModule\(.*WITH_GENERIC_TESTS.*?\)", text, re.S)
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    for script in (MODULE / "Scripts").glob("*.py"):
        assert f"Scripts/{script.name}" in text
    registered = (MODULE / "Testing" / "Python" / "CMakeLists.txt").read_text()
    for test in (MODULE / "Testing" / "Python").glob("*.py"):
        assert f"slicer_add_python_unittest(SCRIPT {test.name})" in registered


def test_the_extension_cmake_has_the_metadata_and_packages_textseglib():
    text = (REPO / "CMakeLists.txt").read_text()

    def value(variable: str) -> str:
        match = re.search(rf'set\({variable} "([^"]*)"\)', text)
        assert match, variable
        return match.group(1)

    assert value("EXTENSION_CATEGORY") == "Segmentation"
    assert value("EXTENSION_DEPENDS") == "PyTorch"
    assert value("EXTENSION_HOMEPAGE") and value("EXTENSION_DESCRIPTION")
    assert value("EXTENSION_ICONURL").endswith("/TextSeg.png")
    assert "add_subdirectory(TextSeg)" in text
    assert "${CMAKE_CURRENT_SOURCE_DIR}/TextSegLib/*.py" in text and "TARGET_NAME TextSegLib" in text


@pytest.mark.parametrize("path", [REPO / "TextSeg.png", MODULE / "Resources" / "Icons" / "TextSeg.png"], ids=str)
def test_icons_are_128_pixels_square(path):
    with Image.open(path) as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        assert len(icon.convert("RGB").getcolors(maxcolors=1 << 16)) > 100, "a drawn icon, not a flat square"


def test_the_pip_installed_packages_are_minimums_the_pyproject_pins_satisfy():
    from packaging.requirements import Requirement

    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {Requirement(d).name.lower(): Requirement(d) for d in dependencies}
    lines = (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
    listed = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    assert {r.name.lower() for r in listed} == set(pins) - {n.lower() for n in NOT_PIP_INSTALLED}
    for requirement in listed:
        assert [spec.operator for spec in requirement.specifier] == [">="], requirement
        pin = pins[requirement.name.lower()]
        pinned = [spec.version for spec in pin.specifier if spec.operator == "=="]
        if pinned:
            assert requirement.specifier.contains(pinned[0]), (requirement, pin)
            assert next(iter(requirement.specifier)).version == pinned[0], (requirement, pin)
        else:
            assert requirement.specifier == pin.specifier, (requirement, pin)


# ------------------------------------------------------------------------------------------------ headless


FAKE_SLICER = {
    "slicer/__init__.py": "from . import util\n",
    "slicer/util.py": "import sys\n\n\ndef exit(status=0):\n    sys.exit(status)\n",
    "TextSeg.py": (
        "class TextSegLogic:\n"
        "    def ensureDependencies(self, askConfirmation=True):\n"
        "        assert askConfirmation is False, 'batch mode never asks'\n"
        "        print('dependencies checked')\n"
    ),
}


@pytest.fixture(scope="module")
def fake_slicer(tmp_path_factory) -> Path:
    """``slicer.util.exit`` and ``TextSeg.TextSegLogic`` as headless Slicer provides them, to run the script."""
    folder = tmp_path_factory.mktemp("fake-slicer")
    for name, text in FAKE_SLICER.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


def run_batch(fake_slicer: Path, *arguments) -> subprocess.CompletedProcess:
    """The script with the fake Slicer first on the path, then this checkout's TextSegLib."""
    script = MODULE / "Scripts" / "TextSegBatch.py"
    return subprocess.run([sys.executable, str(script), *map(str, arguments)], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300,
                          env={"PYTHONPATH": os.pathsep.join([str(fake_slicer), str(REPO)]), "PATH": "/usr/bin:/bin",
                               "TEXTSEG_MODELS_DIR": str(fake_slicer / "models")})


def test_the_headless_script_runs_textseg_segment(fake_slicer, tmp_path, data_dir, small_checkpoint):
    slab = tmp_path / "lung2_slab.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(data_dir / "lung2_image.nrrd"))[:, :, 26:32], str(slab))
    output = tmp_path / "out" / "lung2.seg.nrrd"
    prompt = "a large soft-tissue mass in the posterior left lower lung"
    done = run_batch(fake_slicer, "--", slab, "-p", prompt, "-m", small_checkpoint, "-o", output, "-q",
                     "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "dependencies checked" in done.stdout and f"Wrote {output}" in done.stdout
    (segment,) = slicerio.read_segmentation(str(output))["segments"]
    assert segment["name"] == prompt and segment["terminology"]["type"] == ["SCT", "4147007", "Mass"]

    malformed = run_batch(fake_slicer, "--", slab)
    assert malformed.returncode == 2 and "required" in malformed.stderr


def test_the_headless_script_says_the_dependency_check_s_refusal_in_one_line(tmp_path):
    """The module's dependency check refuses with a RuntimeError (here: a Slicer too old); the script says its first
    line and exits with 1, before anything is read."""
    old_slicer = tmp_path / "old-slicer"
    for name, text in FAKE_SLICER.items():
        (old_slicer / name).parent.mkdir(parents=True, exist_ok=True)
        (old_slicer / name).write_text(text)
    (old_slicer / "TextSeg.py").write_text(
        "class TextSegLogic:\n"
        "    def ensureDependencies(self, askConfirmation=True):\n"
        "        raise RuntimeError('TextSeg needs 3D Slicer 5.10 or later.\\nDetails for the log.')\n")
    done = run_batch(old_slicer, "--", tmp_path / "never-read.nrrd", "-p", "liver", "-m", "m")
    assert (done.returncode, done.stderr) == (1, "TextSegBatch: error: TextSeg needs 3D Slicer 5.10 or later.\n")
