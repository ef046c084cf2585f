import dataclasses
import io
import json
import os
import unicodedata
import zipfile

import numpy as np
import pytest
from PIL import Image

from pogdiff.config import DataConfig
from pogdiff.data.loader import cluster_captions, load_image_text_set, subject_from_caption
from pogdiff.data.validation import DatasetError, Issue, ValidationReport
from tests.fakes import BLUE, GREEN, RED, HashEncoder, issue, jsonl, png, write_folder, write_zip

CFG = DataConfig(resolution=16)


def two_cats_two_dogs(**extra):
    return {
        "metadata.jsonl": jsonl(
            {"file_name": "a.png", "text": "a photo of Tom, sitting", "subject": "cat", "age": 3},
            {"file_name": "b.png", "text": "a photo of Tom, sleeping", "subject": "cat", "age": 4},
            {"file_name": "c.png", "text": "a photo of Rex", "subject": "dog", "age": 5},
            {"file_name": "d.png", "text": "a photo of Rex", "subject": "dog", "age": 6},
        ),
        "a.png": png(RED), "b.png": png(RED), "c.png": png(BLUE), "d.png": png(BLUE),
        **extra,
    }


# --- layouts -----------------------------------------------------------------------------------


def test_metadata_jsonl_with_subject_column(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, two_cats_two_dogs()), CFG)
    assert len(ds) == 4 and ds.class_source == "column"
    assert ds.classes == ["cat", "dog"] and ds.subjects == ["cat", "cat", "dog", "dog"]
    assert ds.captions[0] == "a photo of Tom, sitting"
    assert ds.samples[2].extra == {"age": 5}
    assert ds.images.shape == (4, 16, 16, 3) and ds.images.dtype == np.uint8
    assert (ds.images[0] == RED).all() and (ds.images[3] == BLUE).all()
    assert ds.report.ok and ds.report.issues == []
    assert ds.report.n_images_found == ds.report.n_images_loaded == 4


def test_metadata_csv_with_class_column(tmp_path):
    csv_text = "file_name,text,class,source\nx/a.png,\"a red thing, bright\",red,cam1\nx/b.png,a blue thing,blue,cam2\nx/c.png,another blue thing,blue,cam2\n"
    write_folder(tmp_path, {"metadata.csv": csv_text, "x/a.png": png(RED), "x/b.png": png(BLUE), "x/c.png": png(BLUE)})
    ds = load_image_text_set(tmp_path, CFG)
    assert ds.class_source == "column" and ds.subjects == ["red", "blue", "blue"]
    assert ds.captions[0] == "a red thing, bright" and ds.samples[0].extra == {"source": "cam1"}
    assert issue(ds, "single_image_class").where == "x/a.png"


def test_metadata_in_a_subfolder_is_relative_to_it(tmp_path):
    write_folder(tmp_path, {
        "train/metadata.jsonl": jsonl({"file_name": "a.png", "text": "a photo of Ann"},
                                      {"file_name": "b.png", "text": "a photo of Ann, again"}),
        "train/a.png": png(), "train/b.png": png(),
    })
    ds = load_image_text_set(tmp_path, CFG)
    assert [s.file_name for s in ds.samples] == ["a.png", "b.png"]  # single top folder read as the root
    assert ds.class_source == "template" and ds.classes == ["Ann"]


def test_sidecar_captions_derive_classes_from_the_template(tmp_path):
    write_folder(tmp_path, {
        "1.png": png(), "1.txt": "a photo of Mira Okafor, about 60 years old, smiling\n",
        "2.jpg": png(fmt="JPEG"), "2.txt": "A photo of Mira Okafor.",
        "3.png": png(), "3.txt": "an image of Jo Lee, wearing glasses",
    })
    ds = load_image_text_set(tmp_path, CFG)
    assert ds.class_source == "template" and ds.class_source_requested == "auto"
    assert ds.subjects == ["Mira Okafor", "Mira Okafor", "Jo Lee"]
    assert ds.captions[0] == "a photo of Mira Okafor, about 60 years old, smiling"
    assert issue(ds, "single_image_class").where == "3.png"


def test_class_folders_use_the_caption_template(tmp_path):
    write_folder(tmp_path, {"golden_retriever/a.png": png(), "golden_retriever/b.png": png(),
                            "tabby-cat/c.png": png(GREEN), "tabby-cat/d.png": png(GREEN)})
    ds = load_image_text_set(tmp_path, dataclasses.replace(CFG, caption_template="a picture of a {subject}"))
    assert ds.class_source == "folder"
    assert ds.subjects == ["golden_retriever", "golden_retriever", "tabby-cat", "tabby-cat"]
    assert ds.captions == ["a picture of a golden retriever"] * 2 + ["a picture of a tabby cat"] * 2
    assert ds.report.issues == []


def test_sidecars_inside_class_folders_keep_folder_classes(tmp_path):
    write_folder(tmp_path, {"cats/a.png": png(), "cats/a.txt": "fluffy", "dogs/b.png": png(), "dogs/b.txt": "wet"})
    ds = load_image_text_set(tmp_path, CFG)
    assert ds.class_source == "folder" and ds.subjects == ["cats", "dogs"] and ds.captions == ["fluffy", "wet"]


def test_free_text_captions_are_clustered(tmp_path):
    texts = ["a small cat on a sofa", "cat sleeping on a sofa", "grey cat on the sofa",
             "a red car on the road", "fast red car on a road", "old car parked on the road"]
    files = {}
    for i, t in enumerate(texts):
        files[f"{i}.png"], files[f"{i}.txt"] = png(), t
    # The default encoder (the shared MiniLM): clusters follow meaning, not only shared words.
    ds = load_image_text_set(write_folder(tmp_path, files), dataclasses.replace(CFG, derive_clusters=2))
    assert ds.class_source == "cluster"
    assert len(set(ds.subjects[:3])) == 1 and len(set(ds.subjects[3:])) == 1 and ds.subjects[0] != ds.subjects[3]
    assert "cat" in ds.subjects[0] and "car" in ds.subjects[3]
    assert "add a 'subject' column" in issue(ds, "classes_clustered").fix


def test_cluster_captions_is_deterministic():
    texts = [f"{w} number {i}" for w in ("apple", "train", "cloud") for i in range(5)]
    names = cluster_captions(texts, 3, encoder=HashEncoder())
    assert names == cluster_captions(texts, 3, encoder=HashEncoder())
    assert len(set(names)) == 3 and [len(set(names[i:i + 5])) for i in (0, 5, 10)] == [1, 1, 1]


@pytest.mark.parametrize("text,subject", [
    ("a photo of Mira Okafor, about 60 years old", "Mira Okafor"),
    ("A Portrait of  Jo , smiling", "Jo"),
    ("an image of a red car.", "a red car"),
    ("photo of Mira", None),
    ("a photo of , x", None),
])
def test_subject_from_caption(text, subject):
    assert subject_from_caption(text) == subject


# --- image normalisation -----------------------------------------------------------------------


def _load_one(tmp_path, data: bytes, name="x.png", cfg=CFG) -> np.ndarray:
    write_folder(tmp_path, {name: data, "metadata.jsonl": jsonl({"file_name": name, "text": "a photo of X"})})
    return load_image_text_set(tmp_path, cfg).images[0]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (32, 16), RED)
    im.paste(BLUE, (0, 0, 32, 8))  # stored: top half blue, bottom half red
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: blue ends on the right
    buf = io.BytesIO()
    im.save(buf, "PNG", exif=exif)
    out = _load_one(tmp_path, buf.getvalue())
    assert (out[:, :6] == RED).all() and (out[:, 10:] == BLUE).all()


def test_centre_crop_then_resize(tmp_path):
    im = Image.new("RGB", (64, 32), GREEN)
    im.paste(RED, (0, 0, 16, 32))
    im.paste(BLUE, (48, 0, 64, 32))
    out = _load_one(tmp_path, _save(im))
    assert (np.abs(out.astype(int) - GREEN).max(-1) <= 2).all()


def _save(im, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("name,data,expected", [
    ("grey.png", png(100, mode="L"), (100, 100, 100)),
    ("clear.png", png((10, 20, 30, 0), mode="RGBA"), (255, 255, 255)),  # composited on white
    ("half.png", png((0, 0, 0, 128), mode="RGBA"), (127, 127, 127)),
    ("la.png", png((0, 0), mode="LA"), (255, 255, 255)),
    ("cmyk.jpg", png((0, 255, 255, 0), mode="CMYK", fmt="JPEG", quality=100), (255, 0, 0)),
    ("deep.png", png(65535 // 2, mode="I;16"), (128, 128, 128)),
    ("pal.gif", _save(Image.new("RGB", (8, 8), BLUE).convert("P")), (0, 0, 255)),
])
def test_image_modes_become_rgb(tmp_path, name, data, expected):
    out = _load_one(tmp_path, data, name)
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - expected).max() <= 3, out[0, 0]


def test_transparent_palette_image_is_composited_on_white(tmp_path):
    im = Image.new("P", (8, 8), 0)
    im.putpalette([0, 0, 0] * 256)
    out = _load_one(tmp_path, _save(im, transparency=0))
    assert (out == 255).all()


# --- validation: one clear message each -------------------------------------------------------


def test_corrupt_image_is_reported_and_the_rest_loads(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, two_cats_two_dogs(**{"b.png": b"\x89PNG not really"})), CFG)
    assert len(ds) == 3 and not ds.report.ok
    i = issue(ds, "corrupt_image")
    assert (i.level, i.where) == ("error", "b.png")
    assert i.message.startswith("Cannot decode the image") and "Re-export the image as PNG or JPEG" in i.fix
    assert ds.report.n_images_found == 4 and ds.report.n_images_loaded == 3


def test_non_image_file(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, two_cats_two_dogs(**{"notes.pdf": b"%PDF-1.4"})), CFG)
    i = issue(ds, "non_image_file")
    assert (i.level, i.where) == ("warning", "notes.pdf")
    assert "Not an image or caption file ('.pdf'); ignored." == i.message and len(ds) == 4


def test_non_image_file_listed_in_metadata_is_an_error(tmp_path):
    files = two_cats_two_dogs(**{"doc.pdf": b"%PDF"})
    files["metadata.jsonl"] += jsonl({"file_name": "doc.pdf", "text": "a photo of a document"})
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "non_image_file")
    assert i.level == "error" and "Listed in the metadata but '.pdf' is not an image type" in i.message


def test_image_missing_from_metadata(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, two_cats_two_dogs(**{"e.png": png()})), CFG)
    i = issue(ds, "missing_caption")
    assert (i.level, i.where, i.message) == ("error", "e.png", "The image is not listed in the metadata; skipped.")
    assert '{"file_name": "e.png", "text": "..."}' in i.fix and len(ds) == 4


def test_image_without_sidecar_caption(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, {"a.png": png(), "a.txt": "a photo of A", "b.png": png(),
                                                     "c.png": png(), "c.txt": "a photo of A"}), CFG)
    i = issue(ds, "missing_caption")
    assert i.where == "b.png" and "Add 'b.txt' with its caption beside it" in i.fix
    assert [s.file_name for s in ds.samples] == ["a.png", "c.png"]


def test_caption_for_a_missing_file(tmp_path):
    files = two_cats_two_dogs()
    files["metadata.jsonl"] += jsonl({"file_name": "gone.png", "text": "a photo of Tom"})
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "caption_for_missing_file")
    assert (i.level, i.where) == ("error", "metadata.jsonl:5")
    assert i.message == "'gone.png' is listed, but there is no such file in the set."


def test_orphan_sidecar_caption_is_a_warning(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, {"a.png": png(), "a.txt": "a photo of A", "b.png": png(),
                                                     "b.txt": "a photo of A", "z.txt": "a photo of Z"}), CFG)
    i = issue(ds, "caption_for_missing_file")
    assert (i.level, i.where) == ("warning", "z.txt") and ds.report.ok


def test_empty_caption(tmp_path):
    files = two_cats_two_dogs()
    files["metadata.jsonl"] = files["metadata.jsonl"].replace('"text": "a photo of Rex"', '"text": "  "', 1)
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "empty_caption")
    assert (i.level, i.where, i.message) == ("error", "metadata.jsonl:3", "The caption of 'c.png' is empty; image skipped.")
    assert len(ds) == 3 and "missing_caption" not in ds.report.codes()


def test_empty_sidecar_caption(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, {"a.png": png(), "a.txt": "a photo of A", "b.png": png(),
                                                     "b.txt": "\n"}), CFG)
    assert issue(ds, "empty_caption").where == "b.txt" and len(ds) == 1


def test_duplicate_file_names_in_metadata(tmp_path):
    files = two_cats_two_dogs()
    files["metadata.jsonl"] += jsonl({"file_name": "./a.png", "text": "a photo of someone else"})
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "duplicate_file_name")
    assert (i.level, i.where) == ("error", "metadata.jsonl:5")
    assert i.message == "'./a.png' is listed again (first at metadata.jsonl:1); the first caption is used."
    assert len(ds) == 4 and ds.captions[0] == "a photo of Tom, sitting"


def test_duplicate_members_in_zip_and_case_clashes(tmp_path):
    z = write_zip(tmp_path / "s.zip", [("a.png", png()), ("a.txt", "a photo of A"), ("a.png", png(BLUE)),
                                       ("A.PNG", png()), ("A.txt", "a photo of A")])
    ds = load_image_text_set(z, CFG)
    dup = [i for i in ds.report.issues if i.code == "duplicate_file_name"]
    assert [(i.level, i.where) for i in dup] == [("error", "a.png"), ("warning", "a.png")]
    assert dup[0].message == "The archive holds this path twice; the first copy is used."
    assert "Differs from 'A.PNG' only in upper/lower case" in dup[1].message
    assert (ds.images[[s.file_name for s in ds.samples].index("a.png")] == RED).all()


def test_wrong_metadata_columns_lists_what_exists(tmp_path):
    files = {"metadata.jsonl": jsonl({"image": "a.png", "caption": "a photo of A"}), "a.png": png()}
    with pytest.raises(DatasetError) as err:
        load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(err.value.report, "metadata_columns")
    assert i.where == "metadata.jsonl"
    assert i.message.startswith("The metadata has no 'file_name' column; columns found: 'image', 'caption'.")
    assert i.fix == "Rename the column 'image' to 'file_name'."
    assert "columns found: 'image', 'caption'" in str(err.value)
    assert err.value.report.codes() == ["metadata_columns"]  # no flood of per-image errors


def test_wrong_caption_column_in_csv(tmp_path):
    files = {"metadata.csv": "file_name,caption\na.png,a photo of A\n", "a.png": png()}
    with pytest.raises(DatasetError, match="Rename the column 'caption' to 'text'"):
        load_image_text_set(write_folder(tmp_path, files), CFG)


def test_json_instead_of_jsonl(tmp_path):
    records = [{"file_name": "a.png", "text": "a photo of A"}, {"file_name": "b.png", "text": "a photo of A"}]
    ds = load_image_text_set(write_folder(tmp_path, {"metadata.json": json.dumps(records), "a.png": png(),
                                                     "b.png": png()}), CFG)
    i = issue(ds, "metadata_json")
    assert (i.level, i.where) == ("warning", "metadata.json")
    assert "instead of metadata.jsonl" in i.message and i.fix.startswith("Rename it to metadata.jsonl")
    assert len(ds) == 2 and ds.classes == ["A"]


def test_unreadable_json_instead_of_jsonl(tmp_path):
    with pytest.raises(DatasetError, match="expected metadata.jsonl"):
        load_image_text_set(write_folder(tmp_path, {"metadata.json": '{"a": [', "a.png": png()}), CFG)


def test_bad_jsonl_line_names_the_line(tmp_path):
    files = two_cats_two_dogs()
    files["metadata.jsonl"] = files["metadata.jsonl"].replace("}\n", "\n", 1)
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    assert issue(ds, "bad_metadata").where == "metadata.jsonl:1" and len(ds) == 3


def test_single_image_class_warning(tmp_path):
    files = two_cats_two_dogs()
    files["metadata.jsonl"] = files["metadata.jsonl"].replace('"subject": "dog", "age": 6', '"subject": "wolf"')
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    single = {i.where: i for i in ds.report.issues if i.code == "single_image_class"}
    assert set(single) == {"c.png", "d.png"} and single["d.png"].level == "warning"
    assert "Class 'wolf' has a single image; PoGDiff needs >= 2 images per class" in single["d.png"].message
    assert "Class 'dog' has a single image" in single["c.png"].message
    assert ds.report.ok and len(ds) == 4


def test_empty_set(tmp_path):
    with pytest.raises(DatasetError, match="no images found") as err:
        load_image_text_set(tmp_path, CFG)
    assert issue(err.value.report, "empty_set").fix.startswith("Upload a folder or .zip with images")


def test_nothing_usable_raises_with_every_reason(tmp_path):
    with pytest.raises(DatasetError, match="none of the images could be used") as err:
        load_image_text_set(write_folder(tmp_path, {"a.png": b"junk", "a.txt": "a photo of A"}), CFG)
    assert "[error] a.png: Cannot decode the image" in str(err.value)


def test_missing_path_and_unsupported_file(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_image_text_set(tmp_path / "nope", CFG)
    (tmp_path / "set.tar").write_bytes(b"x")
    with pytest.raises(DatasetError, match="not a folder or a .zip archive"):
        load_image_text_set(tmp_path / "set.tar", CFG)


def test_unicode_file_names(tmp_path):
    nfd = unicodedata.normalize("NFD", "café_東京.png")  # as macOS writes it
    files = {"metadata.jsonl": jsonl({"file_name": "café_東京.png", "text": "a photo of Zoë"},
                                     {"file_name": "ñ.png", "text": "a photo of Zoë"}),
             nfd: png(), "ñ.png": png()}
    ds = load_image_text_set(write_folder(tmp_path / "f", files), CFG)
    assert [s.file_name for s in ds.samples] == ["café_東京.png", "ñ.png"] and ds.classes == ["Zoë"]
    z = write_zip(tmp_path / "u.zip", list(files.items()))
    dz = load_image_text_set(z, CFG)
    assert dz.captions == ds.captions and dz.report.ok


# --- zip archives -------------------------------------------------------------------------------


def test_zip_matches_folder(tmp_path):
    files = two_cats_two_dogs()
    folder = load_image_text_set(write_folder(tmp_path / "f", files), CFG)
    zipped = load_image_text_set(write_zip(tmp_path / "s.zip", list(files.items())), CFG)
    assert zipped.captions == folder.captions and zipped.subjects == folder.subjects
    assert np.array_equal(zipped.images, folder.images)


def test_zip_with_a_single_top_folder(tmp_path):
    files = [(f"my set/{k}", v) for k, v in two_cats_two_dogs().items()] + [("__MACOSX/my set/._a.png", b"x")]
    ds = load_image_text_set(write_zip(tmp_path / "s.zip", files), CFG)
    assert [s.file_name for s in ds.samples] == ["a.png", "b.png", "c.png", "d.png"] and ds.report.issues == []


def test_zip_of_class_folders_under_a_top_folder(tmp_path):
    files = [("top/cats/a.png", png()), ("top/cats/b.png", png()), ("top/dogs/c.png", png()), ("top/dogs/d.png", png())]
    ds = load_image_text_set(write_zip(tmp_path / "s.zip", files), CFG)
    assert ds.class_source == "folder" and ds.classes == ["cats", "dogs"]


def test_zip_with_one_class_folder_keeps_it(tmp_path):
    ds = load_image_text_set(write_zip(tmp_path / "s.zip", [("cats/a.png", png()), ("cats/b.png", png())]), CFG)
    assert ds.class_source == "folder" and ds.classes == ["cats"] and ds.captions == ["a photo of cats"] * 2


def test_zip_slip_and_absolute_paths_are_refused(tmp_path):
    files = [("a.png", png()), ("a.txt", "a photo of A"), ("b.png", png()), ("b.txt", "a photo of A"),
             ("../evil.png", png()), ("/abs/evil.png", png()), ("C:/win/evil.png", png())]
    z = write_zip(tmp_path / "s.zip", files)
    assert {m.filename for m in zipfile.ZipFile(z).infolist()} >= {"../evil.png", "/abs/evil.png"}
    ds = load_image_text_set(z, CFG)
    unsafe = {i.where: i for i in ds.report.issues if i.code == "unsafe_path"}
    assert set(unsafe) == {"../evil.png", "/abs/evil.png", "C:/win/evil.png"}
    assert unsafe["../evil.png"].message == "This archive member climbs out of the archive with '..'; skipped."
    assert unsafe["/abs/evil.png"].message == "This archive member is an absolute path; skipped."
    assert [s.file_name for s in ds.samples] == ["a.png", "b.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zip"]  # nothing extracted


def test_unsafe_file_name_in_metadata(tmp_path):
    files = two_cats_two_dogs()
    files["metadata.jsonl"] += jsonl({"file_name": "../../etc/passwd", "text": "x"})
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    assert issue(ds, "unsafe_path").where == "metadata.jsonl:5"


def test_zip_bomb_member_is_refused(tmp_path):
    bomb = b"\0" * (2 << 20)  # 2 MiB of zeros compress about 1000:1
    files = [("a.png", png()), ("a.txt", "a photo of A"), ("b.png", png()), ("b.txt", "a photo of A"),
             ("big.png", bomb), ("big.txt", "a photo of A")]
    ds = load_image_text_set(write_zip(tmp_path / "s.zip", files), CFG)
    i = issue(ds, "zip_bomb")
    assert i.where == "big.png" and i.message.startswith("Compression ratio ")
    assert "exceeds the limit of 200:1 (a zip bomb?); skipped." in i.message and len(ds) == 2
    ok = load_image_text_set(tmp_path / "s.zip", dataclasses.replace(CFG, max_compression_ratio=1e6))
    assert issue(ok, "corrupt_image").where == "big.png"  # allowed through, then fails to decode


def test_zip_uncompressed_total_limit(tmp_path):
    z = write_zip(tmp_path / "s.zip", [("a.png", png()), ("a.txt", "a photo of A")], zipfile.ZIP_STORED)
    with pytest.raises(DatasetError, match="it unpacks to too much data") as err:
        load_image_text_set(z, dataclasses.replace(CFG, max_uncompressed_bytes=50))
    assert "raise DataConfig.max_uncompressed_bytes" in issue(err.value.report, "zip_bomb").fix


def test_oversize_archive(tmp_path):
    z = write_zip(tmp_path / "s.zip", [("a.png", png()), ("a.txt", "a photo of A")])
    with pytest.raises(DatasetError, match="it is too large") as err:
        load_image_text_set(z, dataclasses.replace(CFG, max_archive_bytes=10))
    i = issue(err.value.report, "archive_too_large")
    assert "the limit is 0.0 MiB" in i.message and "DataConfig.max_archive_bytes" in i.fix


def test_too_many_files(tmp_path):
    files = [(f"{k}.png", png()) for k in range(4)]
    with pytest.raises(DatasetError, match="too many files") as err:
        load_image_text_set(write_zip(tmp_path / "s.zip", files), dataclasses.replace(CFG, max_files=3))
    assert issue(err.value.report, "too_many_files").message == "The archive holds 4 files; the limit is 3."
    write_folder(tmp_path / "f", dict(files))
    with pytest.raises(DatasetError, match="too many files"):
        load_image_text_set(tmp_path / "f", dataclasses.replace(CFG, max_files=3))


def test_pixel_limit_per_image(tmp_path):
    files = {"a.png": png(size=(8, 8)), "a.txt": "a photo of A", "b.png": png(size=(40, 30)), "b.txt": "a photo of A"}
    ds = load_image_text_set(write_folder(tmp_path, files), dataclasses.replace(CFG, max_image_pixels=1000))
    i = issue(ds, "image_too_large")
    assert i.where == "b.png" and i.message == "The image is 40x30 = 1,200 pixels; the limit is 1,000; skipped."
    assert len(ds) == 1


def test_corrupt_archive(tmp_path):
    (tmp_path / "s.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DatasetError, match="Could not open the archive") as err:
        load_image_text_set(tmp_path / "s.zip", CFG)
    assert "Re-create the archive" in issue(err.value.report, "corrupt_archive").fix


def test_symlink_out_of_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(png())
    root = write_folder(tmp_path / "set", {"a.png": png(), "a.txt": "a photo of A", "b.txt": "a photo of A"})
    os.symlink(secret, root / "b.png")
    ds = load_image_text_set(root, CFG)
    assert issue(ds, "unsafe_path").where == "b.png" and len(ds) == 1


# --- report -------------------------------------------------------------------------------------


def test_report_markdown_frame_and_error_text():
    report = ValidationReport(n_images_found=3, n_images_loaded=2)
    report.error("corrupt_image", "x|y.png", "Cannot decode.", "Re-export it.")
    report.warning("single_image_class", "z.png", "Class 'z' has a single image.", "Add one.")
    assert not report.ok and len(report.errors) == 1 and len(report.warnings) == 1
    md = report.to_markdown()
    assert md.startswith("**Problems found**: 2 of 3 images loaded; 1 error(s), 1 warning(s)")
    assert "| error | `corrupt_image` | `x\\|y.png` | Cannot decode. | Re-export it. |" in md
    frame = report.to_frame()
    assert list(frame.columns) == ["level", "code", "where", "message", "fix"] and len(frame) == 2
    assert ValidationReport().to_markdown() == "**OK**: 0 of 0 images loaded; 0 error(s), 0 warning(s)\n"
    err = DatasetError("Cannot load 'x'.", report)
    assert isinstance(err, ValueError) and err.report is report
    assert str(err) == "Cannot load 'x'.\n  [error] x|y.png: Cannot decode. Fix: Re-export it."
    with pytest.raises(ValueError, match="level must be one of"):
        Issue("debug", "c", "w", "m", "f")
