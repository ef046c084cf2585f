"""The embedded long-tailed demo set, rendered from :mod:`pogdiff.data.identities`.

Three splits, each written as a folder in the same layout a user uploads (PNG images plus a
``metadata.jsonl`` with ``file_name``, ``text``, ``subject``, ``age``, ``smiling``, ``glasses``):

- ``train``: the fine-tuning identities with long-tailed counts (:func:`long_tail_counts`);
- ``eval``: ``n_eval_per_identity`` held-out real images per fine-tuning identity, drawn with a
  different seed from ``train``;
- ``pretrain``: a balanced set of *other* identities (disjoint names) to pretrain a base model,
  so that fine-tuning starts from a model that has never seen the fine-tuning identities.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pogdiff.config import cache_root

from .identities import Attributes, Identity, caption, make_families, make_identities, sample_attributes
from .render import render

logger = logging.getLogger(__name__)

# Bump when the renderer or the on-disk layout changes: cached demo folders are rebuilt.
DEMO_FORMAT_VERSION = 2
SPEC_FILE = "demo_spec.json"
SPLITS = ("train", "eval", "pretrain")
_SPLIT_IDS = {"train": 1, "eval": 2, "pretrain": 3, "val": 4}
VALIDATION_SPLIT = "val"  # held-out images for choosing a knob, apart from the evaluation split
DEMO_KINDS = ("identities", "families")
FAMILY_RELATIVE_COUNTS = (2, 3, 4)  # train images of the rare relatives, in turn
FAMILY_HEAD_MIN = 12  # train images of the least frequent family head
SHEET_TRAIN_COLUMNS = 8
SHEET_EVAL_COLUMNS = 2
SHEET_ZOOM = 3


@dataclass
class DemoSpec:
    """Everything that determines the demo set; its hash names the cache folder."""

    seed: int = 0
    n_identities: int = 24  # fine-tuning identities, long-tailed
    max_count: int = 100  # head identity train images
    min_count: int = 2  # tail identity train images
    n_eval_per_identity: int = 8  # held-out real images per identity (evaluation split)
    n_pretrain_identities: int = 40  # disjoint, balanced set of other identities
    n_pretrain_per_identity: int = 40
    resolution: int = 32
    # "identities": independent, well-separated people. "families": ``n_families`` frequent heads,
    # each with ``relatives`` rare look-alikes (same surname, two traits changed; README "The embedded demo set").
    kind: str = "identities"
    n_families: int = 8
    relatives: int = 2

    def __post_init__(self) -> None:
        if self.kind not in DEMO_KINDS:
            raise ValueError(f"unknown demo kind {self.kind!r}; choose one of {', '.join(DEMO_KINDS)}")
        if self.kind == "families":
            self.n_identities = self.n_families * (1 + self.relatives)

    def to_json(self) -> dict:
        return {"format_version": DEMO_FORMAT_VERSION, **dataclasses.asdict(self)}


@dataclass
class RenderedSet:
    """Rendered images with their captions. ``images``: uint8 ``[N, H, W, 3]``."""

    images: np.ndarray
    captions: list[str]
    subjects: list[str]
    attributes: list[Attributes]

    def __len__(self) -> int:
        return len(self.captions)


def long_tail_alpha(spec: DemoSpec) -> float:
    """Zipf exponent that puts the last identity exactly at ``min_count``."""
    if spec.n_identities < 2 or spec.max_count <= spec.min_count:
        return 0.0
    return math.log(spec.max_count / spec.min_count) / math.log(spec.n_identities)


def long_tail_counts(spec: DemoSpec) -> list[int]:
    """Train images per fine-tuning identity, sorted descending (Zipf-like long tail).

    ``n_i = max(min_count, round(max_count * (i + 1) ** -alpha))`` for ``i = 0 .. n - 1``, with
    ``alpha = ln(max_count / min_count) / ln(n)``, so the head identity has ``max_count`` images
    and the last one exactly ``min_count`` (rounding half up). The defaults (24 identities,
    100 -> 2, alpha ~ 1.23) give
    ``[100, 43, 26, 18, 14, 11, 9, 8, 7, 6, 5, 5, 4, 4, 4, 3, 3, 3, 3, 3, 2, 2, 2, 2]``
    (287 images): 3 many-shot (> 20), 9 medium-shot (5..20) and 12 few-shot (< 5) identities,
    imbalance ratio 50.
    """
    if spec.kind == "families":
        return family_counts(spec)
    if spec.n_identities < 1:
        raise ValueError(f"n_identities must be >= 1, got {spec.n_identities}")
    if not 1 <= spec.min_count <= spec.max_count:
        raise ValueError(f"need 1 <= min_count <= max_count, got {spec.min_count}, {spec.max_count}")
    alpha = long_tail_alpha(spec)
    return [
        max(spec.min_count, math.floor(spec.max_count * (i + 1) ** -alpha + 0.5))
        for i in range(spec.n_identities)
    ]


def family_counts(spec: DemoSpec) -> list[int]:
    """Train images per identity of the families set, in :func:`demo_identities` order.

    Heads follow a Zipf-like tail from ``max_count`` down to ``FAMILY_HEAD_MIN`` (defaults:
    ``[100, 49, 33, 24, 19, 16, 14, 12]``); relatives cycle through ``FAMILY_RELATIVE_COUNTS``.
    """
    n = spec.n_families
    alpha = math.log(spec.max_count / FAMILY_HEAD_MIN) / math.log(n) if n > 1 else 0.0
    counts, r = [], 0
    for i in range(n):
        counts.append(max(FAMILY_HEAD_MIN, math.floor(spec.max_count * (i + 1) ** -alpha + 0.5)))
        for _ in range(spec.relatives):
            counts.append(FAMILY_RELATIVE_COUNTS[r % len(FAMILY_RELATIVE_COUNTS)])
            r += 1
    return counts


def _identity_pool(spec: DemoSpec) -> list[Identity]:
    """The identities demo: fine-tuning identities first, then the pretraining ones."""
    # One call for both sets: names are unique and big traits spread across both, and since
    # make_identities is prefix-stable the fine-tuning identities do not depend on the pretrain count.
    return make_identities(_n_identities_demo(spec) + spec.n_pretrain_identities, spec.seed)


def _n_identities_demo(spec: DemoSpec) -> int:
    return spec.n_identities if spec.kind == "identities" else DemoSpec().n_identities


def demo_identities(spec: DemoSpec) -> list[Identity]:
    """Fine-tuning identities; list order = class order = :func:`long_tail_counts` order.

    For ``kind="families"``: each family's head, then its relatives; no name is shared with the
    pretraining identities (the same ones as the identities demo, so one base model serves both).
    """
    if spec.kind == "families":
        taken = [ident.name for ident in _identity_pool(spec)]
        families = make_families(spec.n_families, spec.relatives, spec.seed, exclude=taken)
        return [member for family in families for member in family]
    return make_identities(spec.n_identities, spec.seed)



def pretrain_identities(spec: DemoSpec) -> list[Identity]:
    """Pretraining identities, none of which shares a name with :func:`demo_identities`."""
    return _identity_pool(spec)[_n_identities_demo(spec):]


def split_seed(seed: int, split: str) -> int:
    """Independent seed of one split (``train``, ``eval`` or ``pretrain``) of a demo seed."""
    return int(np.random.SeedSequence([seed, _SPLIT_IDS[split]]).generate_state(1)[0])


def render_set(
    identities: Sequence[Identity], counts: int | Sequence[int], seed: int, size: int = 32
) -> RenderedSet:
    """Render ``counts[i]`` images of ``identities[i]`` (or ``counts`` each), identity by identity.

    Identity ``i`` draws its attributes from ``default_rng([seed, i])``, so the images of one
    identity do not change when other identities are added or their counts change.
    """
    if isinstance(counts, (int, np.integer)):
        counts = [int(counts)] * len(identities)
    if len(counts) != len(identities):
        raise ValueError(f"got {len(counts)} counts for {len(identities)} identities")
    images, captions, subjects, attributes = [], [], [], []
    for i, (ident, n) in enumerate(zip(identities, counts)):
        rng = np.random.default_rng([seed, i])
        for _ in range(int(n)):
            attrs = sample_attributes(rng)
            images.append(np.asarray(render(ident, attrs, size), dtype=np.uint8))
            captions.append(caption(ident, attrs))
            subjects.append(ident.name)
            attributes.append(attrs)
    array = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return RenderedSet(array, captions, subjects, attributes)


def spec_hash(spec: DemoSpec) -> str:
    blob = json.dumps(spec.to_json(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def default_demo_dir(spec: DemoSpec = DemoSpec()) -> Path:
    """``$POGDIFF_CACHE/demo-<hash>``, or ``~/.cache/pogdiff/demo-<hash>`` without the variable."""
    base = cache_root()
    return base / f"demo-{spec_hash(spec)}"


def ensure_demo(spec: DemoSpec = DemoSpec(), root: str | Path | None = None) -> Path:
    """Build the demo set once (cached) and return its folder; ``root`` overrides the cache root."""
    out = Path(root) / f"demo-{spec_hash(spec)}" if root is not None else default_demo_dir(spec)
    return make_demo_set(out, spec)


def _is_built(out_dir: Path, spec: DemoSpec) -> bool:
    try:
        return json.loads((out_dir / SPEC_FILE).read_text()) == spec.to_json()
    except (OSError, ValueError):
        return False


def make_demo_set(out_dir: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write ``train/``, ``eval/``, ``pretrain/``, ``contact_sheet.png`` and ``demo_spec.json``.

    Idempotent: returns at once when ``out_dir/demo_spec.json`` matches ``spec``. Written to a
    temporary folder next to ``out_dir`` and renamed into place, so a reader never sees a
    half-written set; a folder with a different spec is replaced.
    """
    out_dir = Path(out_dir)
    if _is_built(out_dir, spec):
        logger.debug("demo set up to date at %s", out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_demo(tmp, spec)
        _replace_dir(tmp, out_dir, spec)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(tmp: Path, out_dir: Path, spec: DemoSpec) -> None:
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if not _is_built(out_dir, spec):  # not a concurrent writer of the same set
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("demo set written to %s", out_dir)


def _write_demo(root: Path, spec: DemoSpec) -> None:
    fine, pre = demo_identities(spec), pretrain_identities(spec)
    size = spec.resolution
    train = render_set(fine, long_tail_counts(spec), split_seed(spec.seed, "train"), size)
    held = render_set(fine, spec.n_eval_per_identity, split_seed(spec.seed, "eval"), size)
    pretrain = render_set(pre, spec.n_pretrain_per_identity, split_seed(spec.seed, "pretrain"), size)
    for name, rendered in (("train", train), ("eval", held), ("pretrain", pretrain)):
        write_image_folder(root / name, rendered)
    contact_sheet(fine, train, held).save(root / "contact_sheet.png")
    (root / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n")


def ensure_validation_split(root: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write ``root/val/`` once: ``n_eval_per_identity`` more held-out images per fine-tuning
    identity, drawn with a seed of their own, for choosing a baseline's knob without looking at the
    evaluation split (BENCHMARKS.md "Quality"). The other splits are left as they are.

    :return: the ``val`` folder.
    """
    folder = Path(root) / VALIDATION_SPLIT
    if (folder / "metadata.jsonl").is_file():
        return folder
    held = render_set(demo_identities(spec), spec.n_eval_per_identity, split_seed(spec.seed, VALIDATION_SPLIT),
                      spec.resolution)
    tmp = Path(tempfile.mkdtemp(prefix=f".{VALIDATION_SPLIT}.tmp-", dir=root))
    try:
        write_image_folder(tmp, held)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "metadata.jsonl").is_file():  # not a concurrent writer of the same split
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def write_image_folder(folder: Path, rendered: RenderedSet) -> None:
    """PNG images plus ``metadata.jsonl`` (Hugging Face imagefolder layout)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[str, int] = {}
    lines = []
    for image, text, subject, attrs in zip(rendered.images, rendered.captions, rendered.subjects, rendered.attributes):
        k = seen.get(subject, 0)
        seen[subject] = k + 1
        file_name = f"{_slug(subject)}_{k:03d}.png"
        Image.fromarray(image).save(folder / file_name, optimize=False)
        row = {"file_name": file_name, "text": text, "subject": subject,
               "age": attrs.age, "smiling": attrs.smiling, "glasses": attrs.glasses}
        lines.append(json.dumps(row, ensure_ascii=False))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def contact_sheet(identities: Sequence[Identity], train: RenderedSet, held: RenderedSet) -> Image.Image:
    """One row per identity: name, train count and traits, up to 8 train and 2 eval images."""
    cell = train.images.shape[1] * SHEET_ZOOM if len(train) else 96
    label_w, pad, header = 300, 6, 28
    gap = 3 * pad
    n_cols = SHEET_TRAIN_COLUMNS + SHEET_EVAL_COLUMNS
    width = label_w + n_cols * (cell + pad) + gap
    height = header + len(identities) * (cell + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    big, small = _font(16), _font(12)
    eval_x = label_w + SHEET_TRAIN_COLUMNS * (cell + pad) + gap
    draw.text((label_w, 6), f"train images (first {SHEET_TRAIN_COLUMNS})", fill="black", font=big)
    draw.text((eval_x, 6), "held-out eval", fill="black", font=big)
    by_subject = {"train": _group(train), "eval": _group(held)}
    for r, ident in enumerate(identities):
        y = header + r * (cell + pad)
        tr = by_subject["train"].get(ident.name, [])
        ev = by_subject["eval"].get(ident.name, [])
        draw.text((pad, y + 8), f"{r:2d}  {ident.name}  (train {len(tr)})", fill="black", font=big)
        traits = ident.describe().split(", ")
        draw.text((pad + 26, y + 32), ", ".join(traits[:2]), fill=(90, 90, 90), font=small)
        draw.text((pad + 26, y + 48), ", ".join(traits[2:]), fill=(90, 90, 90), font=small)
        for c, idx in enumerate(tr[:SHEET_TRAIN_COLUMNS]):
            _paste(sheet, train.images[idx], label_w + c * (cell + pad), y, cell)
        for c, idx in enumerate(ev[:SHEET_EVAL_COLUMNS]):
            _paste(sheet, held.images[idx], eval_x + c * (cell + pad), y, cell)
    return sheet


def _group(rendered: RenderedSet) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(rendered.subjects):
        groups.setdefault(s, []).append(i)
    return groups


def _paste(sheet: Image.Image, image: np.ndarray, x: int, y: int, cell: int) -> None:
    sheet.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y))
