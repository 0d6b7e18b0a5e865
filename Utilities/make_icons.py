"""Draw TextSeg's icons: ``TextSeg.png`` (extension) and ``TextSeg/Resources/Icons/TextSeg.png`` (module).

The picture: an axial CT-like slice (body, two lungs, spine) with an orange segmentation outline around a lesion,
and a speech bubble holding lines of text and a text cursor, pointing at the lesion. Drawn at 4x and downsampled
for smooth edges; 128 x 128 RGBA. Needs Pillow (installed with the test tools)::

    .venv/bin/python Utilities/make_icons.py
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SIZE = 128
SCALE = 4
REPOSITORY = Path(__file__).resolve().parents[1]
TARGETS = (REPOSITORY / "TextSeg.png", REPOSITORY / "TextSeg" / "Resources" / "Icons" / "TextSeg.png")

BACKGROUND_TOP = (32, 45, 66)
BACKGROUND_BOTTOM = (18, 26, 40)
BODY = (178, 178, 172)
BODY_EDGE = (225, 225, 218)
LUNG = (40, 44, 52)
SPINE = (246, 246, 240)
LESION = (150, 150, 146)
OUTLINE = (242, 90, 51)
BUBBLE = (250, 250, 252)
TEXT_LINE = (120, 134, 156)
CURSOR = (242, 90, 51)


def _s(*values: float) -> tuple[int, ...]:
    """Icon coordinates (0..128) to drawing coordinates."""
    return tuple(round(v * SCALE) for v in values)


def _blob(x: float, y: float, radius: float, points: int = 72) -> list[tuple[int, ...]]:
    """A lumpy closed outline around ``(x, y)``, like a lesion."""
    outline = []
    for n in range(points):
        angle = 2 * math.pi * n / points
        r = radius * (1 + 0.12 * math.sin(3 * angle + 0.6) + 0.06 * math.sin(5 * angle))
        outline.append(_s(x + r * math.cos(angle), y + r * math.sin(angle)))
    return outline


def draw_icon() -> Image.Image:
    """The 128 x 128 icon."""
    size = SIZE * SCALE
    gradient = Image.linear_gradient("L").resize((size, size))
    background = Image.composite(Image.new("RGB", (size, size), BACKGROUND_BOTTOM),
                                 Image.new("RGB", (size, size), BACKGROUND_TOP), gradient)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rounded_rectangle(_s(2, 2, 126, 126), radius=22 * SCALE, fill=255)
    icon = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    icon.paste(background, (0, 0), mask)
    draw = ImageDraw.Draw(icon)

    # The slice: body, lungs, spine, a soft-tissue lesion in the patient's left lung (image right).
    draw.ellipse(_s(14, 44, 114, 116), fill=BODY, outline=BODY_EDGE, width=2 * SCALE)
    draw.ellipse(_s(24, 54, 60, 104), fill=LUNG)
    draw.ellipse(_s(68, 54, 104, 104), fill=LUNG)
    draw.ellipse(_s(58, 98, 70, 110), fill=SPINE)
    draw.polygon(_blob(87.0, 81.0, 9.0), fill=LESION)

    # The segmentation: translucent fill and a bold outline around the lesion.
    overlay = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    overlay_draw = ImageDraw.Draw(overlay)
    outline = _blob(87.0, 81.0, 13.0)
    overlay_draw.polygon(outline, fill=(*OUTLINE, 90))
    overlay_draw.line([*outline, outline[0]], fill=(*OUTLINE, 255), width=3 * SCALE, joint="curve")
    icon = Image.alpha_composite(icon, overlay)

    # The speech bubble with text and a cursor, its tail pointing at the lesion.
    shadow = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    ImageDraw.Draw(shadow).rounded_rectangle(_s(9, 11, 83, 45), radius=9 * SCALE, fill=(0, 0, 0, 110))
    icon = Image.alpha_composite(icon, shadow.filter(ImageFilter.GaussianBlur(2 * SCALE)))
    draw = ImageDraw.Draw(icon)
    draw.rounded_rectangle(_s(8, 8, 82, 42), radius=9 * SCALE, fill=BUBBLE)
    draw.polygon([_s(58, 40), _s(72, 40), _s(80, 64)], fill=BUBBLE)
    for top, right in ((15, 66), (24, 74), (33, 48)):
        draw.rounded_rectangle(_s(16, top, right, top + 4), radius=2 * SCALE, fill=TEXT_LINE)
    draw.rectangle(_s(53, 30, 55.5, 40), fill=CURSOR)
    draw.rectangle(_s(50, 29, 58.5, 31), fill=CURSOR)
    draw.rectangle(_s(50, 39, 58.5, 41), fill=CURSOR)
    return icon.resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def main() -> None:
    """Write both icon files."""
    icon = draw_icon()
    for target in TARGETS:
        target.parent.mkdir(parents=True, exist_ok=True)
        icon.save(target, optimize=True)
        print(f"Wrote {target.relative_to(REPOSITORY)} ({icon.width} x {icon.height})")


if __name__ == "__main__":
    main()
