"""Standard terminology for what a prompt names, in the form 3D Slicer stores it on a segment.

A segment's terminology says *what* it is with coded concepts (DICOM / SNOMED CT), so that Slicer shows the
structure's name, other software can read the meaning, and DICOM SEG export carries it. Slicer stores it as one
string in the segment tag ``TerminologyEntry``::

    <context>~<category>~<type>~<type modifier>~<anatomic context>~<anatomic region>~<region modifier>

where each coded concept is ``scheme^value^meaning`` (``^^`` when absent). An entry resolves in Slicer only if its
category, type and type modifier are in the context it names (matched by scheme and code value), so each row of the
tables below names the context Slicer ships that has it: "Segmentation category and type - 3D Slicer General Anatomy
list" (the Segment Editor's default) where it has the type, else "Segmentation category and type - DICOM master
list" (Breast, Nodule, Neoplasm, Inflammation). Anatomic regions and their Left/Right modifiers are from "Anatomic
codes - DICOM master list". Codes and meanings are written as those context files spell them (Slicer 5.10 to 5.12,
``../shared/data/slicer-terminologies``); ``Testing/io/test_terminology.py`` checks every entry with Slicer's own
terminology logic. All codes are SNOMED CT (scheme ``SCT``).

:func:`terminology_for_prompt` maps a prompt to an entry by keywords:

- a finding (tumour/neoplasm, mass, nodule, infection/inflammation, and an unspecified lesion such as "lesion",
  "shadow" or "opacity") in an organ: category "Morphologically Altered Structure", the finding as type, the organ
  as anatomic region ("a nodule in the right upper lung" -> Nodule, region Lung, modifier Right);
- an organ alone: category "Anatomical Structure", the organ as type ("the liver" -> Liver);
- a finding alone: the finding without region;
- anything else: Slicer's generic entry for a new segment, "Tissue".

Neither Slicer context has a concept for an unspecified lesion (SNOMED CT "Lesion", 52988006, is in none of them),
so such a lesion is recorded as "Mass", the closest general type both lists have, and an infection as
"Inflammation"; the segment's name keeps the prompt's own words. When a prompt names several organs, the first one
mentioned is the one the finding is in; when it names several findings, the most specific wins (neoplasm, mass,
nodule, inflammation, then an unspecified lesion). Laterality (a single "left" or "right") is recorded for paired
organs (lungs, kidneys, breasts, adrenal glands).

Colours: an organ gets the colour Slicer's context recommends for it (for a paired organ both sides share one, which
is also used without a side); Breast has none there and, like every finding and "Tissue", takes the caller's palette
colour, so that several findings in one segmentation stay apart (Slicer would give every Mass the same green).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "ANATOMIC_CONTEXT",
    "DICOM_MASTER",
    "FINDINGS",
    "GENERAL_ANATOMY",
    "STRUCTURES",
    "Code",
    "Finding",
    "Structure",
    "TerminologyEntry",
    "terminology_for_prompt",
]

GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


@dataclass(frozen=True)
class Code:
    """One coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str

    def __str__(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


# Both contexts file organs under "Anatomical Structure" and findings under "Morphologically Altered Structure";
# the General Anatomy list files "Tissue" under the category "Tissue".
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")
TISSUE = Code("SCT", "85756007", "Tissue")
RIGHT = Code("SCT", "24028007", "Right")
LEFT = Code("SCT", "7771000", "Left")
MASS = Code("SCT", "4147007", "Mass")


@dataclass(frozen=True)
class Structure:
    """An organ TextSeg recognises in prompts.

    Attributes:
        code: SNOMED CT concept (the same code serves as type and as anatomic region).
        keywords: regular expressions matched as whole words, case-insensitively.
        color: display colour (RGB 0..255) that Slicer's context recommends for the organ, or None for the palette.
        paired: the organ has a left and a right (laterality is recorded).
        context: the category and type context that has the organ as a type.
    """

    code: Code
    keywords: tuple[str, ...]
    color: tuple[int, int, int] | None = None
    paired: bool = False
    context: str = GENERAL_ANATOMY


@dataclass(frozen=True)
class Finding:
    """A kind of abnormality TextSeg recognises in prompts (most specific first in :data:`FINDINGS`).

    Attributes:
        code: SNOMED CT concept of the type.
        keywords: regular expressions matched as whole words, case-insensitively.
        context: the category and type context that has the finding as a type.
    """

    code: Code
    keywords: tuple[str, ...]
    context: str = GENERAL_ANATOMY


STRUCTURES: tuple[Structure, ...] = (
    Structure(Code("SCT", "10200004", "Liver"), ("livers?", "hepatic"), (221, 130, 101)),
    Structure(Code("SCT", "39607008", "Lung"), ("lungs?", "pulmonary"), (197, 165, 145), paired=True),
    Structure(Code("SCT", "12738006", "Brain"), ("brains?", "cerebral", "cerebrum", "intracranial"), (250, 250, 225)),
    Structure(Code("SCT", "76752008", "Breast"), ("breasts?", "mammary"), paired=True, context=DICOM_MASTER),
    Structure(Code("SCT", "64033007", "Kidney"), ("kidneys?", "renal"), (185, 102, 83), paired=True),
    Structure(Code("SCT", "15776009", "Pancreas"), ("pancreas", "pancreatic"), (249, 180, 111)),
    Structure(Code("SCT", "78961009", "Spleen"), ("spleen", "splenic"), (157, 108, 162)),
    Structure(Code("SCT", "28231008", "Gallbladder"), ("gall ?bladder",), (139, 150, 98)),
    Structure(Code("SCT", "69695003", "Stomach"), ("stomach", "gastric"), (216, 132, 105)),
    Structure(Code("SCT", "89837001", "Bladder"), ("urinary bladder", "bladder"), (222, 154, 132)),
    Structure(Code("SCT", "80891009", "Heart"), ("heart", "cardiac"), (206, 110, 84)),
    Structure(Code("SCT", "41216001", "Prostate"), ("prostate", "prostatic"), (230, 158, 140)),
    Structure(Code("SCT", "69748006", "Thyroid"), ("thyroid",), (62, 162, 114)),
    Structure(Code("SCT", "23451007", "Adrenal gland"), ("adrenals?",), (249, 186, 150), paired=True),
    Structure(Code("SCT", "32849002", "Esophagus"), ("o?esophag(?:us|eal)",), (211, 171, 143)),
    Structure(Code("SCT", "71854001", "Colon"), ("colon", "colonic"), (204, 168, 143)),
    Structure(Code("SCT", "15825003", "Aorta"), ("aorta", "aortic"), (224, 97, 76)),
)

FINDINGS: tuple[Finding, ...] = (
    Finding(Code("SCT", "108369006", "Neoplasm"),
            ("tumou?rs?", "neoplasms?", "cancers?", "carcinomas?", "malignan(?:cy|cies|t)", r"metasta\w*"),
            DICOM_MASTER),
    Finding(MASS, ("mass(?:es)?",)),
    Finding(Code("SCT", "27925004", "Nodule"), ("nodules?", "nodular"), DICOM_MASTER),
    Finding(Code("SCT", "23583003", "Inflammation"),
            ("infect(?:ion|ions|ed)", "inflam(?:mation|mations|ed|matory)"), DICOM_MASTER),
    # An unspecified lesion: no context Slicer ships has "Lesion" (see the module docstring).
    Finding(MASS, ("lesions?", "shadows?", "opacit(?:y|ies)", "abnormalit(?:y|ies)")),
)


def _pattern(keywords: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile(r"\b(?:" + "|".join(keywords) + r")\b", re.IGNORECASE)


_STRUCTURE_PATTERNS = [(structure, _pattern(structure.keywords)) for structure in STRUCTURES]
_FINDING_PATTERNS = [(finding, _pattern(finding.keywords)) for finding in FINDINGS]
_LEFT = _pattern(("left",))
_RIGHT = _pattern(("right",))


@dataclass(frozen=True)
class TerminologyEntry:
    """A segment's terminology: category, type and, for findings, the anatomic region they are in.

    Attributes:
        category: category concept ("Anatomical Structure", "Morphologically Altered Structure", "Tissue").
        type: type concept (the organ, or the finding).
        type_modifier: laterality of an organ, or None.
        region: the organ a finding is in, or None.
        region_modifier: laterality of that organ, or None.
        color: display colour (RGB 0..1) that goes with the entry, or None (use the palette).
        context: the category and type context that has category, type and type modifier.
    """

    category: Code
    type: Code
    type_modifier: Code | None = None
    region: Code | None = None
    region_modifier: Code | None = None
    color: tuple[float, float, float] | None = None
    context: str = GENERAL_ANATOMY

    def to_slicer(self) -> str:
        """The ``TerminologyEntry`` tag value 3D Slicer reads (and slicerio parses)."""
        def code(value: Code | None) -> str:
            return "^^" if value is None else str(value)

        return "~".join((
            self.context, str(self.category), str(self.type), code(self.type_modifier),
            ANATOMIC_CONTEXT, code(self.region), code(self.region_modifier),
        ))

    @property
    def label(self) -> str:
        """Readable summary, e.g. ``"Nodule in Right Lung"``, shown in the module's panel before a run.

        Segments are named after their prompt (name not auto-generated), so Slicer does not rename them from the
        terminology (its own form would be ``"Nodule in Lung, Right"``: ``nameFromTerminology`` in
        Modules/Loadable/Terminologies/Widgets/qSlicerTerminologyNavigatorWidget.cxx).
        """
        def named(concept: Code, modifier: Code | None) -> str:
            return f"{modifier.meaning} {concept.meaning}" if modifier else concept.meaning

        text = named(self.type, self.type_modifier)
        if self.region is not None:
            text += f" in {named(self.region, self.region_modifier)}"
        return text


GENERIC = TerminologyEntry(TISSUE, TISSUE)


def _first_structure(prompt: str) -> Structure | None:
    """The structure the prompt mentions first (table order breaks ties)."""
    found = [(match.start(), order) for order, (_, pattern) in enumerate(_STRUCTURE_PATTERNS)
             if (match := pattern.search(prompt))]
    return STRUCTURES[min(found)[1]] if found else None


def _laterality(prompt: str) -> Code | None:
    left, right = bool(_LEFT.search(prompt)), bool(_RIGHT.search(prompt))
    if left == right:
        return None
    return LEFT if left else RIGHT


def terminology_for_prompt(prompt: str) -> TerminologyEntry:
    """The terminology entry for what ``prompt`` names (see the module docstring for the rules)."""
    structure = _first_structure(prompt)
    finding = next((f for f, pattern in _FINDING_PATTERNS if pattern.search(prompt)), None)
    side = _laterality(prompt) if structure is not None and structure.paired else None
    if finding is not None:
        return TerminologyEntry(MORPHOLOGICALLY_ALTERED_STRUCTURE, finding.code,
                                region=structure.code if structure else None, region_modifier=side,
                                context=finding.context)
    if structure is not None:
        color = tuple(c / 255.0 for c in structure.color) if structure.color else None
        return TerminologyEntry(ANATOMICAL_STRUCTURE, structure.code, type_modifier=side, color=color,
                                context=structure.context)
    return GENERIC
