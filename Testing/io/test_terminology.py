"""Every terminology entry TextSeg can produce resolves in the Slicer context it names.

The check is Slicer's own: slicer-core's ``vtkSlicerTerminologiesModuleLogic`` loads the three context files that
Slicer loads by default (``../shared/data/slicer-terminologies``), parses each ``TerminologyEntry`` string with
``DeserializeTerminologyEntry`` and walks the loaded context for the category, type, type modifier, anatomic region
and region modifier. Slicer finds a code by coding scheme and code value (``GetCodeInArray`` in
Modules/Loadable/Terminologies/Logic/vtkSlicerTerminologiesModuleLogic.cxx, v5.10.0 to master); the test also asks
for the context's code meaning, so that what the segment shows reads as Slicer's own list.

Entries are enumerated through prompts, the only way TextSeg makes them: every structure alone and with each side
where it is paired, every finding alone and in every structure (with each side where paired), and the generic entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import slicer

from TextSegLib.io.terminology import FINDINGS, STRUCTURES, TerminologyEntry, terminology_for_prompt

TERMINOLOGIES = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "slicer-terminologies"
GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC = "Anatomic codes - DICOM master list"
INVALID_COLOR = (127, 127, 127)  # vtkSlicerTerminologyType::INVALID_COLOR: "no recommended colour"


@pytest.fixture(scope="module")
def logic() -> slicer.vtkSlicerTerminologiesModuleLogic:
    if not (TERMINOLOGIES / "AnatomicRegionAndModifier-DICOM-Master.json").is_file():
        pytest.fail(f"Slicer's terminology contexts are missing: expected them in {TERMINOLOGIES}")
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(
        str(TERMINOLOGIES / "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json")) == GENERAL_ANATOMY
    assert logic.LoadTerminologyFromFile(
        str(TERMINOLOGIES / "SegmentationCategoryTypeModifier-DICOM-Master.json")) == DICOM_MASTER
    assert logic.LoadRegionContextFromFile(
        str(TERMINOLOGIES / "AnatomicRegionAndModifier-DICOM-Master.json")) == ANATOMIC
    return logic


def _triple(code) -> tuple[str, str, str]:
    return code.GetCodingSchemeDesignator(), code.GetCodeValue(), code.GetCodeMeaning()


def _find(count: int, get, wanted, kind=slicer.vtkSlicerTerminologyType):
    """The first item of a context list with the coding scheme and code value of ``wanted`` (as Slicer matches)."""
    for index in range(count):
        item = kind()
        assert get(index, item)
        if _triple(item)[:2] == _triple(wanted)[:2]:
            return item
    return None


def resolve(logic, serialized: str) -> dict[str, object]:
    """Resolve a ``TerminologyEntry`` string strictly in the contexts it names; raise AssertionError if it does not.

    Returns the resolved objects and the colour Slicer's terminology navigator recommends for the entry (the
    modifier's colour, else the type's, else none: ``terminologyRecommendedColor`` in
    Modules/Loadable/Terminologies/Widgets/qSlicerTerminologyNavigatorWidget.cxx).
    """
    entry = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(serialized, entry), serialized
    context = entry.GetTerminologyContextName()
    assert context in (GENERAL_ANATOMY, DICOM_MASTER), serialized

    category = _find(logic.GetNumberOfCategoriesInTerminology(context),
                     lambda i, c: logic.GetNthCategoryInTerminology(context, i, c), entry.GetCategoryObject(),
                     slicer.vtkSlicerTerminologyCategory)
    assert category is not None, f"category not in {context!r}: {serialized}"
    assert _triple(category) == _triple(entry.GetCategoryObject()), serialized

    type_ = _find(logic.GetNumberOfTypesInTerminologyCategory(context, category),
                  lambda i, t: logic.GetNthTypeInTerminologyCategory(context, category, i, t), entry.GetTypeObject())
    assert type_ is not None, f"type not in category {category.GetCodeMeaning()!r} of {context!r}: {serialized}"
    assert _triple(type_) == _triple(entry.GetTypeObject()), serialized

    color = type_.GetRecommendedDisplayRGBValue()
    modifier = None
    if entry.GetTypeModifierObject().GetCodeValue():
        assert type_.GetHasModifiers(), f"type has no modifiers in {context!r}: {serialized}"
        modifier = _find(
            logic.GetNumberOfTypeModifiersInTerminologyType(context, category, type_),
            lambda i, m: logic.GetNthTypeModifierInTerminologyType(context, category, type_, i, m),
            entry.GetTypeModifierObject())
        assert modifier is not None, f"type modifier not in {context!r}: {serialized}"
        assert _triple(modifier) == _triple(entry.GetTypeModifierObject()), serialized
        if modifier.GetRecommendedDisplayRGBValue() != INVALID_COLOR:
            color = modifier.GetRecommendedDisplayRGBValue()

    region = region_modifier = None
    if entry.GetRegionObject().GetCodeValue():
        assert category.GetShowAnatomy(), f"{context!r} lists no anatomic region for this category: {serialized}"
        region_context = entry.GetRegionContextName()
        assert region_context == ANATOMIC, serialized
        region = _find(logic.GetNumberOfRegionsInRegionContext(region_context),
                       lambda i, r: logic.GetNthRegionInRegionContext(region_context, i, r), entry.GetRegionObject())
        assert region is not None, f"region not in {region_context!r}: {serialized}"
        assert _triple(region) == _triple(entry.GetRegionObject()), serialized
        if entry.GetRegionModifierObject().GetCodeValue():
            region_modifier = _find(
                logic.GetNumberOfRegionModifierInRegion(region_context, region),
                lambda i, m: logic.GetNthRegionModifierInRegion(region_context, region, i, m),
                entry.GetRegionModifierObject())
            assert region_modifier is not None, f"region modifier not in {region_context!r}: {serialized}"
            assert _triple(region_modifier) == _triple(entry.GetRegionModifierObject()), serialized
    else:
        assert not entry.GetRegionModifierObject().GetCodeValue(), serialized

    return {"context": context, "category": category, "type": type_, "modifier": modifier, "region": region,
            "region_modifier": region_modifier, "color": None if color == INVALID_COLOR else color}


def _name(code) -> str:
    return code.meaning.lower()


def every_entry() -> dict[str, TerminologyEntry]:
    """Every entry TextSeg can produce, by the prompt that produces it."""
    prompts = ["a cystic structure"]
    for structure in STRUCTURES:
        sides = ("", "left ", "right ") if structure.paired else ("",)
        prompts += [f"the {side}{_name(structure.code)}" for side in sides]
        prompts += [f"a {_name(finding.code)} in the {side}{_name(structure.code)}"
                    for finding in FINDINGS for side in sides]
    prompts += [f"a {_name(finding.code)}" for finding in FINDINGS]
    return {prompt: terminology_for_prompt(prompt) for prompt in prompts}


def test_the_enumeration_reaches_every_structure_finding_and_side():
    entries = every_entry().values()
    assert {e.type for e in entries if e.region is None} >= {s.code for s in STRUCTURES} | {f.code for f in FINDINGS}
    assert {e.region for e in entries} == {s.code for s in STRUCTURES} | {None}
    assert {(e.region, e.region_modifier) for e in entries if e.region_modifier} == {
        (s.code, side) for s in STRUCTURES if s.paired for side in {e.type_modifier for e in entries} - {None}}
    assert len({e.type_modifier for e in entries} - {None}) == 2  # left and right
    assert any(e.type.meaning == "Tissue" for e in entries)


@pytest.mark.parametrize("prompt", list(every_entry()))
def test_every_entry_resolves_in_the_context_it_names(logic, prompt):
    entry = terminology_for_prompt(prompt)
    resolved = resolve(logic, entry.to_slicer())
    parsed = slicer.vtkSlicerTerminologyEntry()
    assert logic.DeserializeTerminologyEntry(entry.to_slicer(), parsed)
    assert logic.SerializeTerminologyEntry(parsed) == entry.to_slicer()
    if entry.region is None and entry.category.meaning == "Anatomical Structure" and resolved["color"] is not None:
        assert entry.color == pytest.approx(tuple(c / 255 for c in resolved["color"]), abs=1e-9), prompt


def test_an_organ_has_the_colour_slicer_recommends_for_it(logic):
    """Slicer's colour where its context has one; a paired organ without a side gets the colour both sides share;
    an organ the context gives no colour gets none (the palette's)."""
    for structure in STRUCTURES:
        name = _name(structure.code)
        entry = terminology_for_prompt(f"the {name}")
        color = resolve(logic, entry.to_slicer())["color"]
        if structure.paired:
            sides = {resolve(logic, terminology_for_prompt(f"the {side} {name}").to_slicer())["color"]
                     for side in ("left", "right")}
            assert len(sides) == 1, name
            color = color or sides.pop()
        assert entry.color == (None if color is None else pytest.approx(tuple(c / 255 for c in color))), name


@pytest.mark.parametrize(("context", "type_", "modifier", "region", "region_modifier", "error"), [
    (GENERAL_ANATOMY, "SCT^27925004^Nodule", "^^", "SCT^39607008^Lung", "SCT^24028007^Right", "type not in"),
    (DICOM_MASTER, "SCT^52988006^Lesion", "^^", "SCT^10200004^Liver", "^^", "type not in"),
    (DICOM_MASTER, "SCT^4147007^Mass", "SCT^24028007^Right", "^^", "^^", "type has no modifiers"),
    (DICOM_MASTER, "SCT^4147007^Mass", "^^", "SCT^12738006^Brain", "SCT^7771000^Left", "region modifier not in"),
])
def test_an_entry_the_context_lacks_does_not_resolve(logic, context, type_, modifier, region, region_modifier,
                                                     error):
    """The check can fail, and says where: a code that is not in the list the entry names is refused."""
    serialized = "~".join((context, "SCT^49755003^Morphologically Altered Structure", type_, modifier, ANATOMIC,
                           region, region_modifier))
    with pytest.raises(AssertionError, match=error):
        resolve(logic, serialized)
