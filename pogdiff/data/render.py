"""Drawing an identity: :func:`render` paints one portrait of an :class:`~pogdiff.data.identities.Identity`
with its per-photo :class:`~pogdiff.data.identities.Attributes`, with PIL ``ImageDraw`` primitives only.

Deterministic: every random choice lives in the two records, so the same identity and attributes
always give the same picture. Drawn at ``SUPERSAMPLE`` times the size asked and downsampled with
LANCZOS for antialiasing; the pose shift is in pixels of a ``REFERENCE_SIZE`` render.
"""

from __future__ import annotations


from PIL import Image, ImageDraw

from pogdiff.data.identities import (
    Attributes,
    BACKGROUNDS,
    GREY_HAIR,
    GREY_MAX,
    Identity,
    REFERENCE_SIZE,
    RGB,
    SUPERSAMPLE,
)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _shade(c: RGB, f: float) -> RGB:
    """f < 1 darkens, f > 1 lightens (towards white)."""
    if f <= 1:
        return tuple(int(round(x * f)) for x in c)  # type: ignore[return-value]
    return _mix(c, (255, 255, 255), f - 1)


class _Pen:
    """Draws in unit coordinates (0..1 across a 32-px frame) with pose shift and scale applied."""

    def __init__(self, draw: ImageDraw.ImageDraw, side: int, attrs: Attributes):
        self.draw, self.side = draw, side
        self.scale = attrs.scale
        self.off_x = attrs.dx / REFERENCE_SIZE
        self.off_y = attrs.dy / REFERENCE_SIZE

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (
            (0.5 + (x - 0.5) * self.scale + self.off_x) * self.side,
            (0.5 + (y - 0.5) * self.scale + self.off_y) * self.side,
        )

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [*self.pt(x0, y0), *self.pt(x1, y1)]

    def w(self, width: float) -> int:
        return max(1, int(round(width * self.side * self.scale)))

    def ellipse(self, box, fill=None, outline=None, width=0.0):
        self.draw.ellipse(self.box(*box), fill=fill, outline=outline, width=self.w(width) if outline else 0)

    def rect(self, box, fill, radius=0.0):
        self.draw.rounded_rectangle(self.box(*box), radius=radius * self.side * self.scale, fill=fill)

    def chord(self, box, start, end, fill):
        self.draw.chord(self.box(*box), start, end, fill=fill)

    def arc(self, box, start, end, fill, width):
        self.draw.arc(self.box(*box), start, end, fill=fill, width=self.w(width))

    def polygon(self, points, fill):
        self.draw.polygon([self.pt(x, y) for x, y in points], fill=fill)

    def line(self, points, fill, width):
        self.draw.line([self.pt(x, y) for x, y in points], fill=fill, width=self.w(width), joint="curve")


# Face geometry in unit coordinates: centre and half-extents per face shape.
_FACE_CX, _FACE_CY = 0.5, 0.45
_FACE_HALF = {
    "oval": (0.205, 0.265),
    "round": (0.24, 0.235),
    "square": (0.225, 0.25),
    "long": (0.175, 0.29),
    "heart": (0.235, 0.26),
}


def render(identity: Identity, attrs: Attributes, size: int = 32) -> Image.Image:
    """Draw one RGB portrait of ``identity`` with ``attrs``; deterministic.

    Drawn at ``SUPERSAMPLE`` times ``size`` and downsampled with LANCZOS for antialiasing.
    """
    side = size * SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUNDS[attrs.background % len(BACKGROUNDS)])
    pen = _Pen(ImageDraw.Draw(img), side, attrs)
    grey = GREY_MAX * min(1.0, max(0.0, (attrs.age - 35) / 35))
    hair = _mix(identity.hair_colour, GREY_HAIR, grey)
    hw, hh = _FACE_HALF[identity.face_shape]
    _draw_back_hair(pen, identity.hair_style, hair, hw, hh)
    _draw_body(pen, identity)
    _draw_face(pen, identity, hw, hh)
    _draw_wrinkles(pen, identity, attrs.age, hw, hh)
    _draw_facial_hair(pen, identity, hair, hw, hh)
    _draw_front_hair(pen, identity.hair_style, hair, hw, hh)
    _draw_features(pen, identity, hair, attrs.smiling, hw)
    if attrs.glasses:
        _draw_glasses(pen, hw)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _draw_back_hair(pen: _Pen, style: str, hair: RGB, hw: float, hh: float) -> None:
    cx, top = _FACE_CX, _FACE_CY - hh
    if style == "long":
        pen.rect((cx - hw - 0.07, top - 0.035, cx + hw + 0.07, 0.9), hair, radius=0.12)
    elif style == "bob":
        pen.rect((cx - hw - 0.06, top - 0.035, cx + hw + 0.06, _FACE_CY + 0.14), hair, radius=0.1)
    elif style == "afro":
        pen.ellipse((cx - hw - 0.13, top - 0.12, cx + hw + 0.13, _FACE_CY + 0.1), fill=hair)
    elif style == "ponytail":
        pen.ellipse((cx + hw - 0.02, _FACE_CY - 0.16, cx + hw + 0.1, _FACE_CY + 0.3), fill=hair)


def _draw_body(pen: _Pen, ident: Identity) -> None:
    skin = ident.skin_tone
    pen.rect((0.43, _FACE_CY + 0.1, 0.57, 0.9), _shade(skin, 0.88))
    pen.chord((0.1, 0.8, 0.9, 1.35), 180, 360, ident.shirt_colour)
    pen.polygon([(0.44, 0.8), (0.56, 0.8), (0.5, 0.88)], _shade(skin, 0.88))  # V-neck


def _draw_face(pen: _Pen, ident: Identity, hw: float, hh: float) -> None:
    skin, cx, cy = ident.skin_tone, _FACE_CX, _FACE_CY
    ear = _shade(skin, 0.92)
    for side in (-1, 1):
        ex = cx + side * hw
        pen.ellipse((ex - 0.035, cy - 0.05, ex + 0.035, cy + 0.05), fill=ear)
    shape = ident.face_shape
    if shape == "square":
        pen.rect((cx - hw, cy - hh, cx + hw, cy + hh), skin, radius=0.07)
    elif shape == "heart":
        pen.ellipse((cx - hw, cy - hh, cx + hw, cy + hh * 0.55), fill=skin)
        pen.polygon([(cx - hw + 0.01, cy), (cx + hw - 0.01, cy), (cx, cy + hh)], skin)
    else:
        pen.ellipse((cx - hw, cy - hh, cx + hw, cy + hh), fill=skin)


def _draw_wrinkles(pen: _Pen, ident: Identity, age: int, hw: float, hh: float) -> None:
    line = _shade(ident.skin_tone, 0.62)
    cx, cy, top = _FACE_CX, _FACE_CY, _FACE_CY - hh
    n_forehead = sum(age >= a for a in (45, 58, 70))
    for k in range(n_forehead):
        y = top + 0.085 + 0.028 * k + (0.02 if ident.hair_style in ("short", "bob", "afro") else 0)
        pen.arc((cx - 0.09, y, cx + 0.09, y + 0.06), 200, 340, line, 0.016)
    if age >= 58:
        for side in (-1, 1):  # smile lines from the nose to the mouth corners
            x0 = cx + side * 0.055
            pen.line([(x0, cy + 0.07), (x0 + side * 0.035, cy + 0.17)], line, 0.016)
            ex = cx + side * (hw - 0.02)  # crow's feet
            pen.line([(ex, cy - 0.03), (ex + side * 0.03, cy - 0.045)], line, 0.012)
            pen.line([(ex, cy - 0.015), (ex + side * 0.03, cy - 0.005)], line, 0.012)


def _draw_facial_hair(pen: _Pen, ident: Identity, hair: RGB, hw: float, hh: float) -> None:
    cx, cy = _FACE_CX, _FACE_CY
    if ident.facial_hair == "beard":
        pen.chord((cx - hw, cy - hh, cx + hw, cy + hh + 0.02), 8, 172, hair)
    elif ident.facial_hair == "goatee":
        pen.ellipse((cx - 0.06, cy + 0.17, cx + 0.06, cy + hh + 0.015), fill=hair)


def _draw_front_hair(pen: _Pen, style: str, hair: RGB, hw: float, hh: float) -> None:
    cx, top = _FACE_CX, _FACE_CY - hh
    left, right = cx - hw - 0.025, cx + hw + 0.025
    if style == "bald":
        for side in (-1, 1):  # side tufts above the ears
            x = cx + side * (hw + 0.005)
            pen.ellipse((x - 0.03, _FACE_CY - 0.12, x + 0.03, _FACE_CY - 0.02), fill=hair)
    elif style == "buzz":
        pen.chord((left + 0.01, top - 0.015, right - 0.01, top + 0.13), 180, 360, hair)
    elif style in ("short", "long", "ponytail"):
        depth = {"short": 0.22, "long": 0.24, "ponytail": 0.18}[style]
        pen.chord((left, top - 0.04, right, top - 0.04 + depth), 180, 360, hair)
        if style == "short":
            for side in (-1, 1):  # sideburns
                x = cx + side * (hw - 0.005)
                pen.rect((x - 0.025, top + 0.05, x + 0.025, _FACE_CY - 0.02), hair)
        if style == "long":
            # side-swept fringe, ending above the eyebrow
            pen.polygon([(cx + 0.03, top + 0.06), (left, top + 0.06), (left, _FACE_CY - 0.07)], hair)
    elif style == "bob":
        pen.chord((left, top - 0.04, right, top + 0.2), 180, 360, hair)
        pen.rect((left + 0.02, top + 0.04, right - 0.02, top + 0.11), hair)  # straight fringe
    elif style == "afro":
        pen.chord((left, top - 0.04, right, top + 0.18), 180, 360, hair)
        for k in range(5):
            x = left + 0.03 + k * (right - left - 0.06) / 4
            pen.ellipse((x - 0.035, top + 0.03, x + 0.035, top + 0.09), fill=hair)
    elif style == "mohawk":
        pen.rect((cx - 0.045, top - 0.14, cx + 0.045, top + 0.07), hair, radius=0.03)
    elif style == "spiky":
        pen.chord((left, top - 0.02, right, top + 0.14), 180, 360, hair)
        for k in range(5):
            x = left + 0.02 + k * (right - left - 0.04) / 4
            pen.polygon([(x - 0.05, top + 0.03), (x + 0.05, top + 0.03), (x, top - 0.1)], hair)


def _draw_features(pen: _Pen, ident: Identity, hair: RGB, smiling: bool, hw: float) -> None:
    cx, cy = _FACE_CX, _FACE_CY
    eye_y = cy - 0.025
    brow = {"thin": 0.014, "medium": 0.024, "thick": 0.036}[ident.eyebrows]
    brow_colour = _shade(hair, 0.8) if sum(hair) > 300 else hair
    for side in (-1, 1):
        ex = cx + side * 0.085
        pen.line([(ex - 0.05, eye_y - 0.055), (ex, eye_y - 0.07), (ex + 0.05, eye_y - 0.055)], brow_colour, brow)
        pen.ellipse((ex - 0.042, eye_y - 0.026, ex + 0.042, eye_y + 0.026), fill=(250, 250, 250))
        pen.ellipse((ex - 0.024, eye_y - 0.024, ex + 0.024, eye_y + 0.024), fill=ident.eye_colour)
        pen.ellipse((ex - 0.01, eye_y - 0.01, ex + 0.01, eye_y + 0.01), fill=(10, 10, 10))
    nose = _shade(ident.skin_tone, 0.7)
    if ident.nose == "small":
        pen.line([(cx, cy + 0.02), (cx, cy + 0.06), (cx + 0.02, cy + 0.065)], nose, 0.016)
    elif ident.nose == "long":
        pen.line([(cx, cy - 0.01), (cx, cy + 0.09), (cx + 0.025, cy + 0.095)], nose, 0.018)
    else:
        pen.ellipse((cx - 0.05, cy + 0.045, cx + 0.05, cy + 0.09), fill=nose)
    half = {"narrow": 0.055, "medium": 0.075, "wide": 0.095}[ident.mouth]
    my = cy + 0.155
    if ident.facial_hair == "moustache":
        pen.rect((cx - half - 0.02, my - 0.06, cx + half + 0.02, my - 0.015), hair, radius=0.02)
    if smiling:
        pen.chord((cx - half, my - 0.045, cx + half, my + 0.055), 0, 180, (150, 30, 40))
        pen.chord((cx - half * 0.8, my - 0.03, cx + half * 0.8, my + 0.025), 0, 180, (250, 250, 250))
    else:
        pen.line([(cx - half * 0.85, my + 0.005), (cx + half * 0.85, my + 0.005)], (150, 60, 60), 0.022)


def _draw_glasses(pen: _Pen, hw: float) -> None:
    cx, eye_y, r = _FACE_CX, _FACE_CY - 0.025, 0.062
    frame = (25, 25, 30)
    for side in (-1, 1):
        ex = cx + side * 0.085
        pen.ellipse((ex - r, eye_y - r, ex + r, eye_y + r), outline=frame, width=0.022)
        pen.line([(ex + side * r, eye_y - 0.01), (cx + side * (hw + 0.01), eye_y - 0.02)], frame, 0.018)
    pen.line([(cx - 0.085 + r, eye_y - 0.005), (cx + 0.085 - r, eye_y - 0.005)], frame, 0.02)
