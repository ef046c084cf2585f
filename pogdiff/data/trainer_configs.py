"""What kohya_ss and OneTrainer users bring: their folders, repeats and per-concept loss weights.

Three ways a set says how often each class is drawn (README "Your own data", "kohya_ss and
OneTrainer sets"), read from the files of an upload only (never a path outside it):

- **kohya folders**: every image sits in a folder named ``<repeats>_<class tokens>``
  (``10_red circle/``); the class is the name after the number, and in one epoch kohya shows each
  image of that folder ``repeats`` times;
- **kohya ``dataset_config.toml``** at the root: ``[[datasets.subsets]]`` with ``image_dir``
  (inside the upload, relative to the file), ``num_repeats`` (default 1), ``class_tokens``,
  ``caption_extension`` and ``keep_tokens``; unknown keys are reported, never dropped silently;
- **OneTrainer concepts** (``concepts.json`` at the root, a list of concepts): ``path``, ``name``,
  ``balancing`` and ``balancing_strategy`` (``REPEATS``: each image ``balancing`` times an epoch,
  fractions allowed; ``SAMPLES``: ``balancing`` images of the concept an epoch), ``loss_weight``.

Each concept is one class. Its *draw weight* is the share of an epoch's draws it gets before
normalising: ``n_c * repeats`` (kohya, OneTrainer REPEATS) or ``samples`` (OneTrainer SAMPLES);
drawing a class with probability proportional to it and then one of its images uniformly gives
every image exactly the share kohya gives it.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from .validation import ValidationReport

KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")
KOHYA_TOML = "dataset_config.toml"
ONETRAINER_CONCEPTS = "concepts.json"
KOHYA_SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "caption_extension", "keep_tokens"}
# Keys of a kohya subset that change how images look or are captioned, not how often they are drawn:
# read by kohya, not by the Studio; reported as such.
KOHYA_KNOWN_IGNORED = {"shuffle_caption", "flip_aug", "color_aug", "random_crop", "caption_dropout_rate",
                       "caption_dropout_every_n_epochs", "caption_tag_dropout_rate", "caption_prefix",
                       "caption_suffix", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                       "bucket_reso_steps", "bucket_no_upscale", "batch_size", "keep_tokens_separator",
                       "secondary_separator", "token_warmup_min", "token_warmup_step", "face_crop_aug_range",
                       "enable_wildcard", "alpha_mask", "cache_info"}
ONETRAINER_KEYS = {"path", "name", "balancing", "balancing_strategy", "loss_weight", "enabled"}
BALANCING_STRATEGIES = ("REPEATS", "SAMPLES")
SOURCE_NAMES = {"kohya_folders": "kohya folders (<repeats>_<name>)", "kohya_toml": f"kohya {KOHYA_TOML}",
                "onetrainer": f"OneTrainer {ONETRAINER_CONCEPTS}"}


@dataclass
class Concept:
    """One class as a trainer config declares it."""

    name: str
    folder: str  # the folder inside the upload whose images belong to it ("" = the root)
    repeats: float = 1.0  # each image this many times an epoch (kohya num_repeats, OneTrainer REPEATS)
    samples: float | None = None  # or this many draws of the concept an epoch (OneTrainer SAMPLES)
    loss_weight: float = 1.0
    caption_extension: str = ".txt"

    def draw_weight(self, n_images: int) -> float:
        """The concept's share of an epoch's draws, before normalising."""
        return float(self.samples) if self.samples is not None else n_images * self.repeats


@dataclass
class TrainerConfig:
    """The concepts found in an upload and which convention declared them (``SOURCE_NAMES``)."""

    source: str
    concepts: list[Concept]
    ignored: list[str] = field(default_factory=list)  # folders the config leaves out (kohya is_reg subsets)

    def concept_of(self, path: str) -> Concept | None:
        """The concept whose folder holds ``path`` (the deepest one), else None."""
        best = None
        for c in self.concepts:
            if (c.folder == "" or path.startswith(c.folder + "/")) and (best is None or len(c.folder) > len(best.folder)):
                best = c
        return best


def kohya_folder(name: str) -> tuple[int, str] | None:
    """``"10_red circle"`` -> ``(10, "red circle")``; None when the name does not follow kohya."""
    m = KOHYA_FOLDER.match(name)
    return (int(m.group(1)), m.group(2).strip()) if m and m.group(2).strip() else None


def find_trainer_config(files: dict, images: list[str], read_text, report: ValidationReport) -> TrainerConfig | None:
    """The trainer config of an upload: its ``dataset_config.toml``, else its OneTrainer
    ``concepts.json``, else kohya folder names when every image sits in a ``<repeats>_<name>``
    folder; None when there is none. Problems are reported as errors naming the file, line and key;
    a broken config yields None (the set loads without it).

    :param files: the upload's files (relative POSIX paths), the only paths that may be named.
    :param images: the image paths of the upload.
    :param read_text: ``path -> str | None``, the text of a file of the upload.
    """
    if KOHYA_TOML in files:
        text = read_text(KOHYA_TOML)
        return None if text is None else read_kohya_toml(text, files, report)
    if ONETRAINER_CONCEPTS in files:
        text = read_text(ONETRAINER_CONCEPTS)
        return None if text is None else read_onetrainer(text, files, report)
    return kohya_folders(images, report)


def kohya_folders(images: list[str], report: ValidationReport) -> TrainerConfig | None:
    """Concepts from kohya folder names, when every image's folder is ``<repeats>_<name>``."""
    folders = {str(PurePosixPath(p).parent) for p in images}
    if not images or "." in folders:
        return None
    parsed = {f: kohya_folder(PurePosixPath(f).name) for f in folders}
    if not any(parsed.values()):
        return None
    concepts = []
    for folder in sorted(folders):
        if parsed[folder] is None:
            report.error("kohya_folder_name", folder, "The folder name does not start with a number of repeats "
                         "like its neighbours ('10_red circle'); its images are read without repeats.",
                         f"Rename it to '<repeats>_{PurePosixPath(folder).name}', e.g. "
                         f"'1_{PurePosixPath(folder).name}'.")
            return None
        repeats, name = parsed[folder]
        if repeats < 1:
            report.error("kohya_repeats", folder, f"Repeats {repeats}: kohya shows such a folder's images never.",
                         "Use a number of repeats of 1 or more, or remove the folder.")
            return None
        concepts.append(Concept(name=name, folder=folder, repeats=float(repeats)))
    return _merged(TrainerConfig("kohya_folders", concepts), report)


def _subset_dir(raw: object, files: dict, where: str, report: ValidationReport) -> str | None:
    """A subset's ``image_dir`` as a folder inside the upload, else None (reported)."""
    if not isinstance(raw, str) or not raw.strip():
        report.error("kohya_toml_key", where, "image_dir is missing or not a text.",
                     "Write image_dir = \"<folder inside the upload>\" in the subset.")
        return None
    path = PurePosixPath(raw.replace("\\", "/").strip())
    if path.is_absolute() or re.match(r"^[A-Za-z]:", raw.strip()) or ".." in path.parts:
        same = _folder_named_like(path, files)
        report.error("kohya_toml_outside", where, f"'{raw}' is outside the upload; nothing there is read.",
                     "Write the path relative to the config file, as a folder of the upload, e.g. "
                     + (f"\"{same}\" (the upload's folder of that name)." if same else f"\"img/{path.name}\"."))
        return None
    folder = str(path).strip("/")
    folder = "" if folder == "." else folder
    if not any(p.startswith(folder + "/") or (folder == "" and "/" not in p) for p in files):
        report.error("kohya_toml_missing_dir", where, f"image_dir '{raw}' is not a folder of the upload.",
                     "Check the folder name (upper and lower case count) or add the folder to the upload.")
        return None
    return folder


def _folder_named_like(path: PurePosixPath, files: dict) -> str | None:
    """The upload's folder whose path is the longest tail of ``path`` (a path on the user's machine), if any."""
    folders = {str(PurePosixPath(f).parent) for f in files}
    folders |= {str(p) for f in folders for p in PurePosixPath(f).parents if str(p) != "."}
    parts = [q for q in path.parts if q not in ("/", "..")]
    for k in range(len(parts)):
        tail = "/".join(parts[k:])
        if tail in folders:
            return tail
    return None


def json_concept_lines(text: str) -> list[dict[str, int]]:
    """Per top-level object of a JSON list, ``{"": the line of its '{', key: the line of each of its own
    keys}`` (1-based), found by scanning the text (json does not keep positions)."""
    out: list[dict[str, int]] = []
    depth, line, in_string, escaped, token = 0, 1, False, False, []
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 2 and out and token:
                    out[-1].setdefault("\0" + "".join(token), line)  # a string at the concept's level: maybe a key
            else:
                token.append(ch)
        elif ch == '"':
            in_string, token = True, []
        elif ch in "[{":
            depth += 1
            if ch == "{" and depth == 2:
                out.append({"": line})
        elif ch in "]}":
            depth -= 1
        if ch == "\n":
            line += 1
    return [{k.lstrip("\0"): v for k, v in keys.items()} for keys in out]


def read_kohya_toml(text: str, files: dict, report: ValidationReport) -> TrainerConfig | None:
    """Concepts of a kohya ``dataset_config.toml`` (one per ``[[datasets.subsets]]``).

    As in kohya, a subset's options may also be set in its ``[[datasets]]`` or in ``[general]`` (the more
    specific one wins); problems name the file's line and the key (:func:`toml_lines`).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        report.error("kohya_toml_syntax", KOHYA_TOML, f"Not valid TOML: {err}.", "Fix the file at that line.")
        return None
    lines = toml_lines(text)

    def where_in(d: int, s: int):
        def where(key: str | None = None) -> str:
            keys = lines.get((d, s), {})
            line = keys.get(key) or keys.get("")
            scope = "[general]" if d < 0 else f"[[datasets]] {d + 1}" + (f", [[datasets.subsets]] {s + 1}" if s >= 0 else "")
            return f"{KOHYA_TOML}{f':{line}' if line else ''} ({scope}{f', key {key}' if key else ''})"
        return where

    for key in sorted(set(doc) - {"general", "datasets"}):
        report.warning("kohya_toml_unread_key", f"{KOHYA_TOML} (table {key})", f"Table '{key}' is not part of a "
                       "kohya dataset config ([general], [[datasets]], [[datasets.subsets]]); it changes nothing here.",
                       "Remove it, or check its spelling.")
    general = doc.get("general", {}) if isinstance(doc.get("general"), dict) else {}
    _report_unread(general, where_in(-1, -1), report)
    concepts, ignored = [], []
    for d, dataset in enumerate(doc.get("datasets", [])):
        _report_unread({k: v for k, v in dataset.items() if k != "subsets"}, where_in(d, -1), report)
        inherited = {**{k: v for k, v in general.items() if k in KOHYA_SUBSET_KEYS},
                     **{k: v for k, v in dataset.items() if k in KOHYA_SUBSET_KEYS}}
        for s, subset in enumerate(dataset.get("subsets", [])):
            _report_unread({k: v for k, v in subset.items() if k != "is_reg"}, where_in(d, s), report)
            if subset.get("is_reg") is True:
                folder = _subset_dir(subset.get("image_dir"), files, where_in(d, s)("image_dir"), report)
                ignored += [folder] if folder is not None else []
                report.warning("kohya_reg_subset", where_in(d, s)("is_reg"), "A regularisation subset (is_reg = true): "
                               "its images are not trained here and are skipped.", "Nothing to do; PoGDiff's 'base' "
                               "teacher (--psi-teacher base) is its prior preservation (README \"The method\").")
                continue
            concept = _kohya_subset({**inherited, **subset}, files, where_in(d, s), report)
            if concept is None:
                return None
            concepts.append(concept)
    if not concepts:
        report.error("kohya_toml_empty", KOHYA_TOML, "No [[datasets.subsets]] found.",
                     "Add one [[datasets.subsets]] with image_dir and num_repeats per class folder.")
        return None
    return _merged(TrainerConfig("kohya_toml", concepts, ignored), report)


def toml_lines(text: str) -> dict[tuple[int, int], dict[str, int]]:
    """Line numbers of a kohya TOML's tables: ``(dataset, subset)`` (0-based; ``(-1, -1)`` is
    ``[general]``, ``(d, -1)`` a ``[[datasets]]``) -> ``{"": the table's header line, key: the line of
    each key}``. Tables written with headers; the keys of an inline subset are not found (its table is)."""
    out: dict[tuple[int, int], dict[str, int]] = {}
    scope: tuple[int, int] | None = None
    d, s = -1, -1
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("[[datasets.subsets]]"):
            s += 1
            scope = (d, s)
        elif line.startswith("[[datasets]]"):
            d, s = d + 1, -1
            scope = (d, -1)
        elif line.startswith("[general]"):
            scope = (-1, -1)
        elif line.startswith("["):
            scope = None
            continue
        elif scope is not None:
            m = re.match(r"""^["']?([A-Za-z0-9_-]+)["']?\s*=""", line)
            if m:
                out.setdefault(scope, {}).setdefault(m.group(1), number)
            continue
        else:
            continue
        out.setdefault(scope, {})[""] = number
    return out


def _report_unread(table: dict, where, report: ValidationReport) -> None:
    """A warning per key of a kohya table that the Studio does not read (never dropped silently)."""
    for key in sorted(set(table) - KOHYA_SUBSET_KEYS):
        known = key in KOHYA_KNOWN_IGNORED
        report.warning("kohya_toml_unread_key", where(key),
                       f"Key '{key}' is {'a kohya option the Studio does not use' if known else 'not a kohya key the Studio knows'}; "
                       "it changes nothing here.", "Remove it, or keep it for kohya; the draws here follow num_repeats.")
    if table.get("keep_tokens") not in (None, 0):
        report.info("kohya_keep_tokens", where("keep_tokens"), f"keep_tokens = {table['keep_tokens']!r} keeps the first "
                    "tags in place when kohya shuffles captions; captions are used here as written, never shuffled.",
                    "Nothing to do.")


def _kohya_subset(subset: dict, files: dict, where, report: ValidationReport) -> Concept | None:
    """One subset (its options merged over its dataset's and [general]'s) as a concept, else None (reported)."""
    folder = _subset_dir(subset.get("image_dir"), files, where("image_dir"), report)
    if folder is None:
        return None
    repeats = subset.get("num_repeats", 1)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        report.error("kohya_repeats", where("num_repeats"), f"num_repeats = {repeats!r}: kohya needs a whole number of 1 or more.",
                     "Write num_repeats = 1 (or more) in the subset.")
        return None
    tokens = subset.get("class_tokens")
    name = tokens.strip() if isinstance(tokens, str) and tokens.strip() else None
    if name is None:
        parsed = kohya_folder(PurePosixPath(folder).name)
        name = parsed[1] if parsed else (PurePosixPath(folder).name or "root")
    ext = subset.get("caption_extension", ".caption")
    if not isinstance(ext, str) or not ext.startswith("."):
        report.error("kohya_toml_key", where("caption_extension"), f"caption_extension = {ext!r} must start with a dot.",
                     "Write caption_extension = \".txt\" (or \".caption\").")
        return None
    return Concept(name=name, folder=folder, repeats=float(repeats), caption_extension=ext)


def read_onetrainer(text: str, files: dict, report: ValidationReport) -> TrainerConfig | None:
    """Concepts of a OneTrainer concepts file (a JSON list; disabled concepts are left out)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as err:
        report.error("onetrainer_json", ONETRAINER_CONCEPTS, f"Not valid JSON at line {err.lineno}: {err.msg}.",
                     "Fix the file at that line (OneTrainer writes it as a JSON list of concepts).")
        return None
    if not isinstance(doc, list):
        report.error("onetrainer_json", ONETRAINER_CONCEPTS, "Expected a JSON list of concepts.",
                     "Save OneTrainer's concepts file as it writes it: [ {\"path\": ..., ...}, ... ].")
        return None
    concepts = []
    lines = json_concept_lines(text)
    for i, item in enumerate(doc):
        keys = lines[i] if i < len(lines) else {}

        def where(key: str | None = None, i=i, keys=keys) -> str:
            line = keys.get(key) or keys.get("")
            return f"{ONETRAINER_CONCEPTS}{f':{line}' if line else ''} (concept {i + 1}{f', key {key}' if key else ''})"

        if not isinstance(item, dict):
            report.error("onetrainer_json", where(), "A concept must be a JSON object.", "Write it as {\"path\": ...}.")
            return None
        if item.get("enabled", True) is False:
            continue
        if "balancing" not in item and "repeats" in item:  # concepts saved before OneTrainer renamed it
            item = {**{k: v for k, v in item.items() if k != "repeats"}, "balancing": item["repeats"]}
        for key in sorted(set(item) - ONETRAINER_KEYS):
            report.info("onetrainer_unread_key", where(key), f"Key '{key}' does not change how often the concept is "
                        "drawn or weighted; not used here.", "Nothing to do.")
        concept = _onetrainer_concept(item, files, where, report)
        if concept is None:
            return None
        concepts.append(concept)
    if not concepts:
        report.error("onetrainer_empty", ONETRAINER_CONCEPTS, "No enabled concept found.",
                     "Add a concept with \"path\" naming a folder of the upload.")
        return None
    return _merged(TrainerConfig("onetrainer", concepts), report)


def _onetrainer_concept(item: dict, files: dict, where, report: ValidationReport) -> Concept | None:
    folder = _subset_dir(item.get("path"), files, where("path"), report)
    if folder is None:
        return None
    strategy = str(item.get("balancing_strategy", "REPEATS")).upper()
    balancing, weight = item.get("balancing", 1.0), item.get("loss_weight", 1.0)
    for key, value in (("balancing", balancing), ("loss_weight", weight)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            report.error("onetrainer_value", where(key), f"{key} = {value!r} must be a number above 0.",
                         f"Write \"{key}\": 1.0 (or another positive number).")
            return None
    if strategy not in BALANCING_STRATEGIES:
        report.error("onetrainer_value", where("balancing_strategy"), f"balancing_strategy = {strategy!r}; OneTrainer knows "
                     f"{' and '.join(BALANCING_STRATEGIES)}.", "Write \"balancing_strategy\": \"REPEATS\".")
        return None
    name = str(item.get("name") or "").strip() or (kohya_folder(PurePosixPath(folder).name) or (0, PurePosixPath(folder).name))[1]
    return Concept(name=name, folder=folder, loss_weight=float(weight),
                   repeats=float(balancing) if strategy == "REPEATS" else 1.0,
                   samples=float(balancing) if strategy == "SAMPLES" else None)


def _merged(config: TrainerConfig, report: ValidationReport) -> TrainerConfig | None:
    """Refuse two concepts in one folder; concepts of one name in several folders stay one class
    only when they agree on how they are drawn."""
    seen: dict[str, Concept] = {}
    for c in config.concepts:
        if c.folder in seen:
            report.error("concept_folder_twice", c.folder, f"Two concepts name the folder '{c.folder}'.",
                         "Keep one concept per folder.")
            return None
        seen[c.folder] = c
    return config


def class_weights(config: TrainerConfig, folder_images: dict[str, int]) -> dict[str, dict]:
    """Per class: its images, repeats, draw weight (:meth:`Concept.draw_weight`), share of an
    epoch's draws and loss weight; concepts of one name are added up.

    :param folder_images: images loaded from each concept's folder.
    """
    out: dict[str, dict] = {}
    for c in config.concepts:
        n = folder_images.get(c.folder, 0)
        entry = out.setdefault(c.name, {"images": 0, "draw_weight": 0.0, "loss_weight": c.loss_weight,
                                        "repeats": c.repeats, "samples": c.samples})
        entry["images"] += n
        entry["draw_weight"] += c.draw_weight(n) if n else 0.0
    total = sum(e["draw_weight"] for e in out.values())
    for entry in out.values():
        entry["share"] = entry["draw_weight"] / total if total > 0 else 0.0
    return out
