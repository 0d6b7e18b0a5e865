"""The Slicer module's files agree with each other, without the Slicer application.

- ``TextSeg.ui`` and ``TextSeg.py``: every widget the code reaches exists with the class its name promises, every
  parameter-node field is bound to exactly one widget that can represent it, every connected slot exists;
- ``TextSeg.py`` (and the module's other Python files) compile, and ``TextSeg.py`` imports nothing heavy at module
  level;
- the module's CMake lists every file under ``TextSeg/Resources`` and registers the tests; the extension's CMake
  carries the metadata and packages TextSegLib; the icons are 128 x 128;
- the packages the module pip-installs are pyproject.toml's pins;
- the headless script hands its command line to ``textseg segment`` and exits with its exit code.
"""

from __future__ import annotations

import ast
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

REPO = Path(__file__).resolve().parents[1]
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
LIGHT_IMPORTS = {"__future__", "importlib", "logging", "math", "re", "sys", "threading", "collections",
                 "pathlib", "typing", "ctk", "qt", "slicer", "vtk"}
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


def test_every_parameter_is_bound_to_one_widget_that_can_represent_it(tree, ui):
    fields = parameter_fields(tree)
    assert set(fields) == {"inputVolume", "modelId", "prompt", "segmentName", "outputSegmentation", "device",
                           "batchSize", "threshold", "probabilityVolume"}
    bound: dict[str, list[str]] = {}
    for name, widget in ui.items():
        parameter = widget["properties"].get("SlicerParameterName")
        if parameter is not None:
            bound.setdefault(parameter, []).append(name)
    assert set(bound) == set(fields), "every field bound, and no widget bound to a field that does not exist"
    for field, annotation in fields.items():
        assert len(bound[field]) == 1, f"{field} is bound to {bound[field]}"
        widget = ui[bound[field][0]]
        kind = widget["class"]
        if annotation.startswith("vtkMRML"):
            assert kind == "qMRMLNodeComboBox" and widget["properties"]["nodeTypes"] == [annotation], field
        elif "Choice(" in annotation:
            assert kind == "QComboBox", field
        elif annotation == "str":
            # QLineEdit by Slicer's connector, ctkComboBox (item data) by TextSeg's own connector.
            assert kind in {"QLineEdit", "ctkComboBox"}, field
        elif re.match(r"(Annotated\[)?int\b", annotation):
            assert kind == "QSpinBox", field
        elif re.match(r"(Annotated\[)?float\b", annotation):
            assert kind in {"ctkSliderWidget", "QDoubleSpinBox"}, field
        else:
            pytest.fail(f"no widget rule for {field}: {annotation}")
    assert ui["batchSizeSpinBox"]["properties"]["specialValueText"] == "automatic"


def test_the_item_data_connector_is_registered_for_the_model_chooser(tree, ui):
    connector = class_node(tree, "TextSegItemDataComboBoxConnector")
    assert [ast.unparse(d) for d in connector.decorator_list] == ["parameterNodeGuiConnector"]
    assert "ctk.ctkComboBox" in ast.unparse(connector)
    assert ui["modelComboBox"]["class"] == "ctkComboBox"


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


def test_the_pip_installed_packages_are_the_pyproject_pins():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {d.replace(" ", "") for d in dependencies if re.split(r"[=<>]", d)[0] not in NOT_PIP_INSTALLED}
    lines = (MODULE / "Resources" / "requirements.txt").read_text().splitlines()
    listed = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    assert listed == expected
    for line in listed:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(==|>=)[0-9][0-9A-Za-z.+]*", line), line


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
    script = MODULE / "Scripts" / "TextSegBatch.py"
    return subprocess.run([sys.executable, str(script), *map(str, arguments)], capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300,
                          env={"PYTHONPATH": str(fake_slicer), "PATH": "/usr/bin:/bin",
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
