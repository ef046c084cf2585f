"""Class sources: DataConfig.class_source chosen explicitly or left on "auto"."""

import dataclasses

import pytest

from tests.fakes import HashEncoder
from pogdiff.config import DataConfig
from pogdiff.data.classes import (
    CLASS_SOURCE_HELP,
    CLASS_SOURCES,
    DEFAULT_CLASS_SOURCE,
    cluster_captions,
    first_tag,
    looks_like_tags,
    subject_from_caption,
)
from pogdiff.data.loader import load_image_text_set
from pogdiff.data.validation import DatasetError
from tests.fakes import jsonl, png, write_folder

CFG = DataConfig(resolution=16)


def cfg(source: str, **kw) -> DataConfig:
    return dataclasses.replace(CFG, class_source=source, **kw)


def sidecars(captions: dict[str, str]) -> dict:
    files = {}
    for path, text in captions.items():
        files[path], files[path.rsplit(".", 1)[0] + ".txt"] = png(), text
    return files


KOHYA = {"1.png": "red fox, outdoors, photo", "2.png": "red fox, snow", "3.png": "barn owl, night, photo",
         "4.png": "barn owl", "5.png": ", untagged start"}


def test_default_is_auto_and_every_source_is_described():
    assert DataConfig().class_source == DEFAULT_CLASS_SOURCE == "auto"
    assert set(CLASS_SOURCE_HELP) == set(CLASS_SOURCES) == {"auto", "column", "folder", "first_tag", "template",
                                                            "cluster"}


def test_unknown_class_source_is_refused(tmp_path):
    write_folder(tmp_path, sidecars({"a.png": "a photo of A"}))
    with pytest.raises(ValueError, match="class_source must be one of auto, column, folder, first_tag, template, "
                                         "cluster; got 'tags'"):
        load_image_text_set(tmp_path, cfg("tags"))


def test_first_tag_source_reads_kohya_tag_captions(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, sidecars(KOHYA)), cfg("first_tag"))
    assert (ds.class_source, ds.class_source_requested) == ("first_tag", "first_tag")
    assert ds.subjects == ["red fox", "red fox", "barn owl", "barn owl"]
    assert ds.captions[0] == "red fox, outdoors, photo"  # the caption itself is kept whole
    bad = [i for i in ds.report.issues if i.code == "no_class_in_caption"]
    assert [i.where for i in bad] == ["5.png"] and "no first tag" in bad[0].message


def test_auto_reads_tag_captions_by_their_first_tag(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, sidecars(KOHYA)), CFG, encoder=HashEncoder())
    assert (ds.class_source, ds.class_source_requested) == ("first_tag", "auto")
    assert ds.subjects == ["red fox", "red fox", "barn owl", "barn owl"]
    assert ds.class_source_reason == ("auto: the captions are tags (4 of 5 comma-separated; 4 of 5 start with a "
                                      "tag another caption starts with too)")
    assert "classes_clustered" not in ds.report.codes()
    [bad] = [i for i in ds.report.issues if i.code == "no_class_in_caption"]
    assert bad.where == "5.png" and "'Class source' in the Data tab" in bad.fix


# A flat kohya-style set: one .txt of tags per image, class tag first, backgrounds varying within a class.
SHAPES = {"red circle": 8, "blue square": 5, "green triangle": 3, "yellow star": 2, "purple hexagon": 1}


def shape_tags() -> dict[str, str]:
    captions, i = {}, 0
    for shape, n in SHAPES.items():
        for j in range(n):
            background = ("white", "black", "grey")[j % 3]
            captions[f"img_{i:03d}.png"] = f"{shape}, {background} background, centered, flat colors"
            i += 1
    return captions


def test_auto_gives_the_tag_classes_of_a_flat_kohya_set_with_their_counts(tmp_path):
    ds = load_image_text_set(write_folder(tmp_path, sidecars(shape_tags())), CFG, encoder=HashEncoder())
    assert ds.class_source == "first_tag" and "19 of 19 comma-separated; 18 of 19" in ds.class_source_reason
    assert {c: ds.subjects.count(c) for c in ds.classes} == SHAPES  # not split by background, not clustered
    assert "classes_clustered" not in ds.report.codes()


def test_auto_still_clusters_free_text_and_names_the_page_control(tmp_path):
    captions = {"1.png": "a cat asleep on a sofa", "2.png": "cat sitting by the window",
                "3.png": "dog, running on grass", "4.png": "a dog with a ball, outdoors"}
    ds = load_image_text_set(write_folder(tmp_path, sidecars(captions)), CFG, encoder=HashEncoder())
    assert ds.class_source == "cluster" and all(s.startswith("cluster ") for s in ds.subjects)
    assert ds.class_source_reason.startswith("auto: no subject column") and "2 of 4 comma-separated" in \
        ds.class_source_reason
    [warned] = [i for i in ds.report.issues if i.code == "classes_clustered"]
    assert "'Class source' in the Data tab" in warned.fix and "'first tag'" in warned.fix
    assert "DataConfig" not in warned.fix + warned.message
    md = ds.report.to_markdown()
    assert "'a photo of &lt;subject&gt;, ...'" in md and "<subject>" not in md  # shown, not swallowed as HTML


@pytest.mark.parametrize("texts,tags", [
    (["red fox, snow", "red fox, grass", "owl"], True),  # 2 of 3 with a comma, 2 of 3 repeated
    (["red fox, snow", "owl, grass", "cat"], False),  # no first tag repeats
    (["red fox", "red fox", "owl, x"], False),  # repeated, but mostly without commas
    (["Red Fox, snow", "red fox , grass", "owl, x", "owl"], True),  # case and spaces do not matter
    ([], False),
])
def test_looks_like_tags(texts, tags):
    assert looks_like_tags(texts) is tags


def test_column_source_beats_folders_and_needs_the_column(tmp_path):
    files = {"metadata.jsonl": jsonl({"file_name": "x/a.png", "text": "a photo of Tom", "subject": "cat"},
                                     {"file_name": "y/b.png", "text": "a photo of Rex", "subject": "dog"}),
             "x/a.png": png(), "y/b.png": png()}
    ds = load_image_text_set(write_folder(tmp_path / "with", files), cfg("column"))
    assert ds.class_source == "column" and ds.subjects == ["cat", "dog"]
    no_column = write_folder(tmp_path / "without", sidecars({"x/a.png": "a photo of Tom", "y/b.png": "a photo of Rex"}))
    assert load_image_text_set(no_column, CFG).class_source == "folder"
    with pytest.raises(DatasetError, match="none of the images could be used") as err:
        load_image_text_set(no_column, cfg("column"))
    assert [i.code for i in err.value.report.errors] == ["no_class_column"]


def test_folder_source_overrides_the_column_and_skips_root_images(tmp_path):
    files = {"metadata.jsonl": jsonl({"file_name": "cats/a.png", "text": "a photo of Tom", "subject": "pet"},
                                     {"file_name": "dogs/b.png", "text": "a photo of Rex", "subject": "pet"},
                                     {"file_name": "c.png", "text": "a photo of Ann", "subject": "pet"}),
             "cats/a.png": png(), "dogs/b.png": png(), "c.png": png()}
    root = write_folder(tmp_path, files)
    assert load_image_text_set(root, CFG).class_source == "column"
    ds = load_image_text_set(root, cfg("folder"))
    assert ds.class_source == "folder" and ds.subjects == ["cats", "dogs"]
    assert [(i.code, i.where) for i in ds.report.errors] == [("not_in_class_folder", "c.png")]
    assert ds.report.n_images_loaded == 2 and ds.images.shape[0] == 2


def test_template_source_uses_the_configured_template(tmp_path):
    captions = {"a.png": "a picture of a golden retriever, running", "b.png": "A picture of a golden retriever.",
                "c.png": "a photo of Mira", "d.png": "dog on grass"}
    ds = load_image_text_set(write_folder(tmp_path, sidecars(captions)),
                             cfg("template", caption_template="a picture of a {subject}"))
    assert ds.class_source == "template" and ds.subjects == ["golden retriever", "golden retriever", "Mira"]
    [bad] = [i for i in ds.report.issues if i.code == "no_class_in_caption"]
    assert bad.where == "d.png" and "does not read 'a picture of a X, ...'" in bad.message


def test_cluster_source_ignores_the_column_and_uses_embeddings(tmp_path):
    texts = ["zebra zebra zebra grass", "zebra zebra zebra sky", "zebra zebra zebra mud",
             "piano piano piano black", "piano piano piano white", "piano piano piano old"]
    rows = [{"file_name": f"{i}.png", "text": t, "subject": "same"} for i, t in enumerate(texts)]
    files = {"metadata.jsonl": jsonl(*rows), **{f"{i}.png": png() for i in range(6)}}
    ds = load_image_text_set(write_folder(tmp_path, files), cfg("cluster", derive_clusters=2), encoder=HashEncoder())
    assert ds.class_source == "cluster" and len(ds.classes) == 2
    assert len(set(ds.subjects[:3])) == 1 and len(set(ds.subjects[3:])) == 1
    assert "zebra" in ds.subjects[0] and "piano" in ds.subjects[3]
    assert "classes_clustered" not in ds.report.codes()  # chosen explicitly: nothing to warn about


def test_cluster_captions_names_count_and_degenerate_cases():
    texts = [f"{w} {w} {w} {i}" for w in ("apple", "train") for i in range(4)] + ["apple apple apple 9"]
    names = cluster_captions(texts, encoder=HashEncoder())  # n = 9: round(sqrt(4.5)) = 2 clusters
    assert len(set(names)) == 2
    assert names[0].startswith("cluster 00: apple") and names[4].startswith("cluster 01: train")  # 00 is the larger
    assert cluster_captions(["same"] * 3, 3, encoder=HashEncoder()) == ["cluster 00: same"] * 3
    assert cluster_captions([], encoder=HashEncoder()) == []
    long = cluster_captions(["word " * 30], encoder=HashEncoder())[0]
    assert len(long) == len("cluster 00: ") + 40 and long.endswith("...")


@pytest.mark.parametrize("text,subject", [
    ("red fox, outdoors, photo", "red fox"),
    ("  barn owl ", "barn owl"),
    (", nothing first", None),
])
def test_first_tag(text, subject):
    assert first_tag(text) == subject


@pytest.mark.parametrize("text,template,subject", [
    ("a picture of a red car, parked", "a picture of a {subject}", "red car"),
    ("{x} a photo of Jo", "{subject} in the wild", None),
    ("Jo the fox in the wild, at night", "{subject} in the wild", "Jo the fox"),
    ("a photo of Jo, smiling", "a picture of a {subject}", "Jo"),  # the built-in patterns still apply
    ("an image of a red car.", "", "a red car"),
])
def test_subject_from_caption_with_a_template(text, template, subject):
    assert subject_from_caption(text, template) == subject
