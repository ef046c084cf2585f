"""Bad input: damaged zip entries, huge entries, and malformed captions (README "Data loading: bad input")."""

import dataclasses
import io
import re
import struct
import tracemalloc
import unicodedata
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image

from pogdiff.config import DataConfig
from pogdiff.data.loader import load_image_text_set
from tests.fakes import BLUE, GREEN, RED, issue, jsonl, png, write_folder, write_zip

CFG = DataConfig(resolution=16)


def noise_png(seed: int, size=(32, 32)) -> bytes:
    """A PNG that does not compress, so its deflate stream is long."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def three_images(bad: bytes | None = None) -> list[tuple[str, bytes | str]]:
    return [("a.png", noise_png(0)), ("a.txt", "a photo of A"),
            ("b.png", bad if bad is not None else noise_png(1)), ("b.txt", "a photo of A"),
            ("c.png", noise_png(2)), ("c.txt", "a photo of A")]


def _data_offset(raw: bytes, info: zipfile.ZipInfo) -> int:
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def _set_header(raw: bytearray, name: str, method: int, crc: int, size: int) -> None:
    """Rewrite method, CRC and uncompressed size of member ``name`` in its local and central headers."""
    info = zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo(name)
    struct.pack_into("<H", raw, info.header_offset + 8, method)
    struct.pack_into("<I", raw, info.header_offset + 14, crc)
    struct.pack_into("<I", raw, info.header_offset + 22, size)
    central = raw.find(b"PK\x01\x02", 0)
    while central != -1:
        name_len = struct.unpack("<H", raw[central + 28: central + 30])[0]
        if raw[central + 46: central + 46 + name_len] == name.encode():
            struct.pack_into("<H", raw, central + 10, method)
            struct.pack_into("<I", raw, central + 16, crc)
            struct.pack_into("<I", raw, central + 24, size)
            return
        central = raw.find(b"PK\x01\x02", central + 4)
    raise AssertionError(f"{name} not in the central directory")


def bad_crc_zip(path):
    """b.png stored, one byte of its data flipped: zipfile raises 'Bad CRC-32' when it is read."""
    write_zip(path, three_images(), zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    at = _data_offset(raw, zipfile.ZipFile(path).getinfo("b.png")) + 200
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    return path


def truncated_deflate_zip(path):
    """b.png holds the first half of a deflate stream that never reaches its end-of-stream marker."""
    data = noise_png(1)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = compressor.compress(data) + compressor.flush()
    write_zip(path, three_images(stream[: len(stream) // 2]), zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    _set_header(raw, "b.png", zipfile.ZIP_DEFLATED, zlib.crc32(data), len(data))
    path.write_bytes(bytes(raw))
    return path


# --- 5. one damaged zip entry ---------------------------------------------------------------


# Python 3.11 reports a truncated deflate stream as a CRC mismatch; later versions as an early end.
@pytest.mark.parametrize("make,expected", [(bad_crc_zip, "Bad CRC-32"),
                                           (truncated_deflate_zip, "Bad CRC-32|ended before")])
def test_a_zip_with_one_damaged_image_loads_the_others(tmp_path, make, expected):
    z = make(tmp_path / "s.zip")
    with pytest.raises(Exception, match=expected):  # the damage is real: zipfile itself refuses the member
        zipfile.ZipFile(z).read("b.png")
    ds = load_image_text_set(z, CFG)
    assert [s.file_name for s in ds.samples] == ["a.png", "c.png"]
    i = issue(ds, "corrupt_file")
    assert (i.level, i.where) == ("error", "b.png") and re.search(expected, i.message) and "Re-create the archive" in i.fix
    assert ds.report.n_images_found == 3 and ds.report.n_images_loaded == 2


def test_a_damaged_caption_file_skips_only_its_image(tmp_path):
    files = three_images()
    files[3] = ("b.txt", "a photo of A, " * 40)  # long enough to flip a byte inside it
    write_zip(tmp_path / "s.zip", files, zipfile.ZIP_STORED)
    raw = bytearray((tmp_path / "s.zip").read_bytes())
    raw[_data_offset(raw, zipfile.ZipFile(tmp_path / "s.zip").getinfo("b.txt")) + 100] ^= 0xFF
    (tmp_path / "s.zip").write_bytes(bytes(raw))
    ds = load_image_text_set(tmp_path / "s.zip", CFG)
    assert issue(ds, "corrupt_file").where == "b.txt" and [s.file_name for s in ds.samples] == ["a.png", "c.png"]


# --- 6. huge entries --------------------------------------------------------------------------


def huge_single_colour_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of one colour, built row by row (never held decoded)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row = b"\x00" + b"\xff" * ((width + 7) // 8)  # filter byte + packed white pixels
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_20000_square_png_is_refused_from_its_header(tmp_path):
    big = huge_single_colour_png(20_000, 20_000)
    assert len(big) < 1 << 20 and struct.unpack(">II", big[16:24]) == (20_000, 20_000)
    z = write_zip(tmp_path / "s.zip", three_images(big))
    ds, peak = _peak_bytes(lambda: load_image_text_set(z, CFG))
    i = issue(ds, "image_too_large")
    assert i.where == "b.png" and i.message.startswith("The image is 20000x20000 = 400,000,000 pixels")
    assert len(ds) == 2 and peak < 8 << 20, peak  # decoding it would take 400 MB even at 1 byte a pixel


def test_a_large_image_is_refused_before_its_bytes_are_read(tmp_path):
    # An incompressible 4 MB BMP passes the compression-ratio check; its header alone says it is too large.
    pixels = np.random.default_rng(0).integers(0, 256, (1000, 4000), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "BMP")
    z = write_zip(tmp_path / "s.zip", three_images(buf.getvalue()))
    cfg = dataclasses.replace(CFG, max_image_pixels=100_000)
    ds, peak = _peak_bytes(lambda: load_image_text_set(z, cfg))
    assert issue(ds, "image_too_large").where == "b.png" and len(ds) == 2
    assert peak < 1 << 20, peak  # the member is 4 MB; only its first chunk is read


def test_an_entry_over_the_size_limit_is_stopped_while_streaming(tmp_path):
    # A caption file of 3 MB: over the per-file limit (8 bytes per allowed pixel, at least 1 MiB).
    letters = np.random.default_rng(0).integers(97, 123, 3 << 20, dtype=np.uint8).tobytes()
    files = three_images()
    files[3] = ("b.txt", letters)
    cfg = dataclasses.replace(CFG, max_image_pixels=1024)
    for ds in (load_image_text_set(write_zip(tmp_path / "s.zip", files), cfg),
               load_image_text_set(write_folder(tmp_path / "f", dict(files)), cfg)):
        i = issue(ds, "file_too_large")
        assert i.where == "b.txt" and "limit of 1.0 MiB" in i.message and "max_image_pixels" in i.fix
        assert [s.file_name for s in ds.samples] == ["a.png", "c.png"]


# --- 9. captions ------------------------------------------------------------------------------


def test_csv_unterminated_quote_does_not_swallow_later_rows(tmp_path):
    csv_text = ('file_name,text\na.png,a photo of A\nb.png,"a photo of A, broken\n'
                'c.png,a photo of A\nd.png,a photo of A\n')
    files = {"metadata.csv": csv_text, "a.png": png(), "b.png": png(), "c.png": png(), "d.png": png()}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "bad_metadata")
    assert i.where == "metadata.csv:3" and "quote" in i.message and "line skipped" in i.message
    assert [s.file_name for s in ds.samples] == ["a.png", "c.png", "d.png"]
    assert ds.captions == ["a photo of A"] * 3


def test_csv_quoted_multiline_caption_still_loads(tmp_path):
    csv_text = 'file_name,text\r\na.png,"a photo of A,\nsmiling"\r\nb.png,a photo of A\u2028B\r\n'
    ds = load_image_text_set(write_folder(tmp_path, {"metadata.csv": csv_text, "a.png": png(), "b.png": png()}), CFG)
    assert ds.captions == ["a photo of A,\nsmiling", "a photo of A\u2028B"] and ds.report.ok


@pytest.mark.parametrize("value,kind", [(3, "int"), (["a", "b"], "list"), ({"t": "x"}, "dict"), (True, "bool")])
def test_jsonl_caption_that_is_not_text_is_rejected(tmp_path, value, kind):
    files = {"metadata.jsonl": jsonl({"file_name": "a.png", "text": "a photo of A"},
                                     {"file_name": "b.png", "text": value},
                                     {"file_name": "c.png", "text": "a photo of A"}),
             "a.png": png(), "b.png": png(), "c.png": png()}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "bad_caption")
    assert i.where == "metadata.jsonl:2" and f"is a {kind}, not text" in i.message
    assert [s.file_name for s in ds.samples] == ["a.png", "c.png"]


@pytest.mark.parametrize("caption", ["\u200b", " \u200b\u2060 ", "\ufeff", "\u00a0\u3000", "\u200d\t"])
def test_invisible_or_blank_captions_are_rejected(tmp_path, caption):
    files = {"metadata.jsonl": jsonl({"file_name": "a.png", "text": "a photo of A"},
                                     {"file_name": "b.png", "text": caption},
                                     {"file_name": "c.png", "text": "a photo of A"}),
             "a.png": png(), "b.png": png(), "c.png": png(),
             "s/x.png": png(), "s/x.txt": caption}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    wheres = {i.where for i in ds.report.issues if i.code == "empty_caption"}
    assert wheres == {"metadata.jsonl:2", "s/x.txt"}
    assert [s.file_name for s in ds.samples] == ["a.png", "c.png"]


def test_zero_width_characters_are_removed_from_captions(tmp_path):
    files = {"a.png": png(), "a.txt": "a photo\u200b of A\u2060", "b.png": png(), "b.txt": "a photo of A"}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    assert ds.captions == ["a photo of A", "a photo of A"] and ds.classes == ["A"]


def test_file_names_differing_only_in_unicode_normalisation_are_reported(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    assert nfc != nfd
    files = {nfc: png(RED), nfd: png(BLUE), "b.png": png(GREEN),
             "café.txt": "a photo of A", "b.txt": "a photo of A"}
    folder = write_folder(tmp_path / "f", files)
    assert len(list(folder.iterdir())) == 5  # the file system keeps both spellings
    for ds in (load_image_text_set(folder, CFG), load_image_text_set(write_zip(tmp_path / "s.zip", list(files.items())), CFG)):
        i = issue(ds, "duplicate_file_name")
        assert i.level == "error" and "Unicode normalisation" in i.message and "Rename one" in i.fix
        assert len(ds) == 2 and ds.report.n_images_loaded == 2


def test_metadata_rows_differing_only_in_unicode_normalisation_are_reported(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD", "café.png")
    files = {"metadata.jsonl": jsonl({"file_name": nfc, "text": "a photo of A"},
                                     {"file_name": nfd, "text": "a photo of B"},
                                     {"file_name": "b.png", "text": "a photo of A"}),
             nfc: png(), "b.png": png()}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    i = issue(ds, "duplicate_file_name")
    assert i.where == "metadata.jsonl:2" and "Unicode normalisation" in i.message
    assert ds.captions == ["a photo of A", "a photo of A"]


def test_a_fake_png_is_named_and_said_what_it_is(tmp_path):
    files = {"a.png": png(), "a.txt": "a photo of A", "fake.png": b"this is not an image at all\n",
             "fake.txt": "a photo of A", "cut.png": png(size=(64, 64))[:60], "cut.txt": "a photo of A"}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    bad = {i.where: i for i in ds.report.errors if i.code == "corrupt_image"}
    assert set(bad) == {"fake.png", "cut.png"} and len(ds) == 1
    fake = bad["fake.png"].message
    assert fake.startswith("Cannot decode the image 'fake.png': its content is in none of the image formats")
    assert fake.endswith("whatever its name says; it starts with the text 'this is not an image at '...; skipped.")
    assert "'cut.png'" in bad["cut.png"].message
    for issue_ in bad.values():  # no object repr of the in-memory buffer
        assert "BytesIO" not in issue_.message and "0x" not in issue_.message


def test_shrunk_images_get_a_note_with_their_sizes(tmp_path):
    files = {"big.png": png(0, size=(6000, 6000), mode="L"), "big.txt": "a photo of A",
             "wide.png": png(size=(40, 20)), "wide.txt": "a photo of A",
             "wide2.png": png(size=(40, 20)), "wide2.txt": "a photo of B",
             "small.png": png(size=(8, 8)), "small.txt": "a photo of B"}
    ds = load_image_text_set(write_folder(tmp_path, files), CFG)
    assert len(ds) == 4 and ds.report.ok and ds.images.shape[1:] == (16, 16, 3)
    [note] = [i for i in ds.report.issues if i.code == "images_resized"]
    assert note.level == "info" and note in ds.report.notes
    assert note.message == ("3 of 4 image(s) were shrunk to 16x16 px (1 from 6000x6000, 2 from 40x20); "
                            "2 of them not square, so centre-cropped to a square first.")
    assert "1 note(s)" in ds.report.summary() and "| info | `images_resized` |" in ds.report.to_markdown()
    same = load_image_text_set(write_folder(tmp_path / "small", {"s.png": png(size=(16, 16)), "s.txt": "x"}), CFG)
    assert "images_resized" not in same.report.codes()  # nothing shrunk, nothing noted
