"""Procedural identity generator: an offline stand-in for face datasets such as AgeDB.

An :class:`Identity` is a person with fixed traits; an :class:`Attributes` record holds what
changes from one photo of that person to the next. :func:`pogdiff.data.render.render` draws a
portrait of the two with PIL ``ImageDraw`` primitives only, deterministically.

Identity traits (``Identity`` fields):

===============  ==============================================================  ==========
trait            values                                                          visibility
===============  ==============================================================  ==========
hair_colour      9 named colours (black ... dyed blue / pink), RGB               big
hair_style       bald, buzz, short, long, bob, afro, mohawk, ponytail, spiky     big
skin_tone        6 tones, RGB                                                    big
shirt_colour     8 named colours, RGB                                            big
face_shape       oval, round, square, long, heart                                big
facial_hair      none, moustache, beard, goatee                                  big
eye_colour       5 colours, RGB                                                  small
nose             small, long, wide                                               small
mouth            narrow, medium, wide                                            small
eyebrows         thin, medium, thick                                             small
===============  ==============================================================  ==========

:func:`make_identities` spreads the *big* traits apart: every new identity is the candidate,
out of a fixed number of random draws, whose big traits differ most from all identities chosen
before it (greedy farthest-point selection on the Hamming distance). No two identities of one
call share all big traits, and the result is prefix-stable: ``make_identities(n + m, seed)[:n]
== make_identities(n, seed)`` (with the same ``exclude``).

Per-image attributes (``Attributes``): age 20..80 (grey hair fraction grows from 35 years,
forehead lines from 45, smile and crow's-feet lines from 58), smiling (an open smile instead of a
flat mouth), glasses (dark round frames), a pose shift ``dx, dy`` in pixels of a 32-px render,
a scale jitter and a background colour index.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

RGB = tuple[int, int, int]

# --- palettes -------------------------------------------------------------------------------

HAIR_COLOURS: dict[str, RGB] = {
    "black": (24, 20, 18),
    "dark brown": (78, 48, 28),
    "chestnut": (140, 78, 36),
    "auburn": (150, 40, 30),
    "copper": (222, 110, 30),
    "golden blonde": (232, 190, 80),
    "platinum": (246, 240, 214),
    "blue": (40, 90, 220),
    "pink": (236, 90, 170),
}
HAIR_STYLES = ("bald", "buzz", "short", "long", "bob", "afro", "mohawk", "ponytail", "spiky")
SKIN_TONES: dict[str, RGB] = {
    "porcelain": (250, 222, 205),
    "light": (236, 196, 164),
    "medium": (208, 160, 118),
    "olive": (176, 132, 88),
    "brown": (130, 86, 56),
    "deep": (80, 52, 36),
}
SHIRT_COLOURS: dict[str, RGB] = {
    "red": (205, 35, 40),
    "blue": (30, 70, 200),
    "green": (40, 150, 60),
    "yellow": (245, 205, 30),
    "purple": (120, 50, 160),
    "orange": (240, 130, 20),
    "teal": (20, 150, 150),
    "white": (245, 245, 245),
}
FACE_SHAPES = ("oval", "round", "square", "long", "heart")
FACIAL_HAIR = ("none", "moustache", "beard", "goatee")
EYE_COLOURS: dict[str, RGB] = {
    "brown": (100, 60, 30),
    "blue": (50, 110, 210),
    "green": (50, 150, 70),
    "grey": (120, 130, 140),
    "amber": (200, 140, 30),
}
NOSES = ("small", "long", "wide")
MOUTHS = ("narrow", "medium", "wide")
EYEBROWS = ("thin", "medium", "thick")
BACKGROUNDS: tuple[RGB, ...] = (
    (200, 200, 204),  # light grey
    (180, 205, 230),  # pale blue
    (190, 220, 190),  # pale green
    (226, 214, 190),  # beige
    (210, 196, 230),  # lavender
    (236, 200, 200),  # pale rose
)

FIRST_NAMES = (
    "Mira", "Jonas", "Aiko", "Tomas", "Leila", "Kwame", "Sofia", "Ravi", "Ingrid", "Mateo",
    "Nadia", "Omar", "Freya", "Dmitri", "Amara", "Hugo", "Yuki", "Priya", "Elias", "Zara",
    "Kenji", "Lucia", "Anders", "Chiara", "Tariq", "Ines", "Felix", "Noor", "Bruno", "Hana",
    "Mikael", "Ayla", "Desmond", "Greta", "Rafael", "Sana", "Oskar", "Leona", "Idris", "Maya",
    "Pavel", "Esme", "Kofi", "Lena", "Arjun", "Sienna", "Marek", "Talia", "Emeka", "Vera",
)
LAST_NAMES = (
    "Okafor", "Lindqvist", "Tanaka", "Novak", "Haddad", "Mensah", "Rossi", "Sharma", "Berg",
    "Alvarez", "Petrova", "Farouk", "Larsen", "Ivanov", "Diallo", "Moreau", "Sato", "Iyer",
    "Keller", "Rahman", "Mori", "Ferreira", "Nilsson", "Bianchi", "Aziz", "Costa", "Weber",
    "Karimi", "Santos", "Kim", "Virtanen", "Demir", "Osei", "Hoffmann", "Reyes", "Qureshi",
    "Dahl", "Marin", "Adeyemi", "Castillo", "Horvat", "Nakamura", "Bauer", "Mbeki", "Quinn",
    "Yilmaz", "Fontaine", "Kowalski", "Abara", "Lund",
)

BIG_TRAITS = ("hair_colour", "hair_style", "skin_tone", "shirt_colour", "face_shape", "facial_hair")
# How many random candidates each new identity is chosen from (greedy farthest point).
CANDIDATES_PER_IDENTITY = 64

ATTRIBUTE_HEADS: dict[str, int] = {"smiling": 2, "glasses": 2, "age_group": 3}
AGE_RANGE = (20, 80)
AGE_GROUP_EDGES = (35, 60)  # age_group 0: < 35, 1: 35..59, 2: >= 60
SHIFT_MAX = 2  # px at 32-px resolution
SCALE_JITTER = 0.06
P_SMILING = 0.5
P_GLASSES = 0.35
REFERENCE_SIZE = 32  # dx, dy are expressed in pixels of a render of this size
SUPERSAMPLE = 4
GREY_HAIR: RGB = (196, 196, 200)
GREY_MAX = 0.65  # hair never turns fully grey, so its colour still identifies the person


@dataclass(frozen=True)
class Identity:
    """A person: fixed traits shared by every photo of them (see the module docstring)."""

    name: str
    hair_colour_name: str
    hair_style: str
    skin_tone_name: str
    shirt_colour_name: str
    face_shape: str
    facial_hair: str
    eye_colour_name: str
    nose: str
    mouth: str
    eyebrows: str

    @property
    def hair_colour(self) -> RGB:
        return HAIR_COLOURS[self.hair_colour_name]

    @property
    def skin_tone(self) -> RGB:
        return SKIN_TONES[self.skin_tone_name]

    @property
    def shirt_colour(self) -> RGB:
        return SHIRT_COLOURS[self.shirt_colour_name]

    @property
    def eye_colour(self) -> RGB:
        return EYE_COLOURS[self.eye_colour_name]

    def big_traits(self) -> tuple[str, ...]:
        """The strongly visible traits that :func:`make_identities` keeps apart."""
        return tuple(getattr(self, _TRAIT_FIELD[t]) for t in BIG_TRAITS)

    def describe(self) -> str:
        """One line of the person's traits, e.g. for a contact sheet or a tooltip."""
        beard = "" if self.facial_hair == "none" else f", {self.facial_hair}"
        return (
            f"{self.hair_colour_name} {self.hair_style} hair, {self.skin_tone_name} skin, "
            f"{self.face_shape} face, {self.shirt_colour_name} shirt{beard}"
        )


@dataclass(frozen=True)
class Attributes:
    """What varies between photos of one identity (all randomness of :func:`render`)."""

    age: int
    smiling: bool
    glasses: bool
    dx: int  # horizontal shift, px of a 32-px render
    dy: int  # vertical shift, px of a 32-px render
    scale: float
    background: int  # index into BACKGROUNDS


_TRAIT_FIELD = {
    "hair_colour": "hair_colour_name",
    "hair_style": "hair_style",
    "skin_tone": "skin_tone_name",
    "shirt_colour": "shirt_colour_name",
    "face_shape": "face_shape",
    "facial_hair": "facial_hair",
}
_TRAIT_VALUES: dict[str, tuple[str, ...]] = {
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_style": HAIR_STYLES,
    "skin_tone": tuple(SKIN_TONES),
    "shirt_colour": tuple(SHIRT_COLOURS),
    "face_shape": FACE_SHAPES,
    "facial_hair": FACIAL_HAIR,
}


# --- identities -----------------------------------------------------------------------------


def make_identities(n: int, seed: int, *, exclude: Iterable[str] = ()) -> list[Identity]:
    """Return ``n`` identities with unique names and well-separated big traits.

    :param n: how many identities (at most ``len(FIRST_NAMES) * len(LAST_NAMES)`` minus excluded).
    :param seed: same seed, same identities.
    :param exclude: names that must not be used (e.g. the identities of another split).
        First and last names are not repeated while unused ones remain (50 of each).
    """
    excluded = set(exclude)
    n_names = len(FIRST_NAMES) * len(LAST_NAMES) - len(excluded)
    if n < 0 or n > n_names:
        raise ValueError(f"n must be in 0..{n_names}, got {n}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1D]))
    used_names = set(excluded)
    chosen: list[tuple[int, ...]] = []
    identities: list[Identity] = []
    for _ in range(n):
        big = _pick_far_candidate(rng, chosen)
        chosen.append(big)
        small = [int(rng.integers(len(v))) for v in (EYE_COLOURS, NOSES, MOUTHS, EYEBROWS)]
        name = _draw_name(rng, used_names)
        used_names.add(name)
        identities.append(_identity_from_indices(name, big, small))
    return identities


# Traits in which a rare relative differs from the frequent head of its family.
FAMILY_TRAITS = ("hair_colour", "facial_hair", "eye_colour")


def make_families(
    n_families: int, relatives: int, seed: int, *, exclude: Iterable[str] = ()
) -> list[list[Identity]]:
    """Families of look-alikes: a head plus ``relatives`` who share its surname and all traits but two.

    Heads are spread apart as in :func:`make_identities`. Relative ``r`` of a family changes the
    hair colour and one more trait of :data:`FAMILY_TRAITS` (facial hair or eye colour, in turn),
    so the relative's nearest caption (the head's, by surname) shows almost the same face and the
    evaluator can still tell them apart. First names are never reused within the call, and no
    full name of ``exclude`` is produced.

    :return: ``n_families`` lists, head first.
    """
    if n_families < 1 or relatives < 1:
        raise ValueError(f"need n_families >= 1 and relatives >= 1, got {n_families} and {relatives}")
    heads = make_identities(n_families, seed, exclude=exclude)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFA]))
    taken = set(exclude) | {h.name for h in heads}
    used_first = {h.name.split(" ", 1)[0] for h in heads}
    families = []
    for head in heads:
        surname = head.name.split(" ", 1)[1]
        members = [head]
        hair_pool = [c for c in HAIR_COLOURS if c != head.hair_colour_name]
        rng.shuffle(hair_pool)
        for r in range(relatives):
            first = _fresh_first_name(rng, used_first, surname, taken)
            used_first.add(first)
            changes = {"name": f"{first} {surname}", "hair_colour_name": hair_pool[r % len(hair_pool)]}
            if r % 2 == 0:
                options = [f for f in FACIAL_HAIR if f != head.facial_hair]
                changes["facial_hair"] = options[int(rng.integers(len(options)))]
            else:
                options = [e for e in EYE_COLOURS if e != head.eye_colour_name]
                changes["eye_colour_name"] = options[int(rng.integers(len(options)))]
            members.append(dataclasses.replace(head, **changes))
        families.append(members)
    return families


def _fresh_first_name(rng: np.random.Generator, used: set[str], surname: str, taken: set[str]) -> str:
    fresh = [f for f in FIRST_NAMES if f not in used and f"{f} {surname}" not in taken]
    if not fresh:
        raise ValueError("ran out of first names for family members: use fewer families or relatives")
    return fresh[int(rng.integers(len(fresh)))]


def _pick_far_candidate(rng: np.random.Generator, chosen: list[tuple[int, ...]]) -> tuple[int, ...]:
    sizes = [len(_TRAIT_VALUES[t]) for t in BIG_TRAITS]
    candidates = np.stack([rng.integers(s, size=CANDIDATES_PER_IDENTITY) for s in sizes], axis=1)
    if not chosen:
        return tuple(int(v) for v in candidates[0])
    prev = np.asarray(chosen)  # [M, T]
    hamming = (candidates[:, None, :] != prev[None, :, :]).sum(-1)  # [C, M]
    # Largest minimum distance first, then largest mean distance (fewer near-twins).
    score = hamming.min(1) * 1000 + hamming.mean(1)
    return tuple(int(v) for v in candidates[int(np.argmax(score))])


def _draw_name(rng: np.random.Generator, used: set[str]) -> str:
    """A random unused name; first and last names not used yet are preferred while any remain."""
    firsts = {n.split(" ", 1)[0] for n in used}
    lasts = {n.split(" ", 1)[-1] for n in used}
    fresh_first = [f for f in FIRST_NAMES if f not in firsts] or list(FIRST_NAMES)
    fresh_last = [l for l in LAST_NAMES if l not in lasts] or list(LAST_NAMES)
    while True:
        name = f"{fresh_first[rng.integers(len(fresh_first))]} {fresh_last[rng.integers(len(fresh_last))]}"
        if name not in used:
            return name
        fresh_first, fresh_last = list(FIRST_NAMES), list(LAST_NAMES)


def _identity_from_indices(name: str, big: tuple[int, ...], small: list[int]) -> Identity:
    values = {_TRAIT_FIELD[t]: _TRAIT_VALUES[t][i] for t, i in zip(BIG_TRAITS, big)}
    return Identity(
        name=name,
        eye_colour_name=tuple(EYE_COLOURS)[small[0]],
        nose=NOSES[small[1]],
        mouth=MOUTHS[small[2]],
        eyebrows=EYEBROWS[small[3]],
        **values,
    )


# --- attributes -----------------------------------------------------------------------------


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Draw one photo's attributes: uniform age, fair-coin smile, glasses, pose, background."""
    return Attributes(
        age=int(rng.integers(AGE_RANGE[0], AGE_RANGE[1] + 1)),
        smiling=bool(rng.random() < P_SMILING),
        glasses=bool(rng.random() < P_GLASSES),
        dx=int(rng.integers(-SHIFT_MAX, SHIFT_MAX + 1)),
        dy=int(rng.integers(-SHIFT_MAX, SHIFT_MAX + 1)),
        scale=float(round(1.0 + rng.uniform(-SCALE_JITTER, SCALE_JITTER), 4)),
        background=int(rng.integers(len(BACKGROUNDS))),
    )


def age_group(age: int) -> int:
    """0: younger than 35, 1: 35..59, 2: 60 and older."""
    return int(age >= AGE_GROUP_EDGES[0]) + int(age >= AGE_GROUP_EDGES[1])


def attribute_labels(attrs: Attributes) -> dict[str, int]:
    """Integer labels for the attribute heads of an evaluator (keys of ATTRIBUTE_HEADS)."""
    return {"smiling": int(attrs.smiling), "glasses": int(attrs.glasses), "age_group": age_group(attrs.age)}


def caption(identity: Identity, attrs: Attributes) -> str:
    """E.g. ``"a photo of Mira Okafor, about 60 years old, smiling, wearing glasses"``.

    The age is rounded to the nearest 5 years; the subject is the text between ``"a photo of "``
    and the first comma, which is how :mod:`pogdiff.data.loader` derives classes from captions.
    """
    parts = [f"a photo of {identity.name}", f"about {5 * math.floor(attrs.age / 5 + 0.5)} years old"]
    if attrs.smiling:
        parts.append("smiling")
    if attrs.glasses:
        parts.append("wearing glasses")
    return ", ".join(parts)
