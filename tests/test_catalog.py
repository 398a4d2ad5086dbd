"""xmsearch.catalog.read_catalog: good rows, attributes, image paths and bad rows.

No server: these run in milliseconds.  Image files are tiny placeholder files, since
read_catalog only checks that the photo exists (its content is checked where decoded).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from xmsearch.catalog import BadRow, read_catalog
from xmsearch.errors import InputError
from xmsearch.preprocess import MAX_TEXT_BYTES


@pytest.fixture()
def photos(tmp_path: Path) -> Path:
    """tmp_path/images/a.jpg, b.jpg, c.jpg (placeholders) and an absolute photo elsewhere."""
    (tmp_path / "images").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "images" / f"{name}.jpg").write_bytes(b"placeholder")
    return tmp_path


def write_jsonl(path: Path, lines: list[object]) -> Path:
    """One JSON document per line; a str entry is written verbatim (for broken lines)."""
    text = "\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def reasons(bad: list[BadRow]) -> dict[int, str]:
    return {b.line: b.reason for b in bad}


def test_jsonl_good_rows_keep_attributes_and_resolve_relative_images(photos: Path) -> None:
    cat = write_jsonl(photos / "catalog.jsonl", [
        {"id": "a", "title": "  red cap ", "image": "images/a.jpg", "category": "hat",
         "price": 9.99, "tags": ["summer", "sale"]},
        {"id": "b", "title": "蓝色羽绒服", "image": "images/b.jpg", "colour": "blue"},
    ])
    good, bad = read_catalog(cat)
    assert bad == []
    assert [r.id for r in good] == ["a", "b"]
    assert [r.line for r in good] == [1, 2]
    a, b = good
    assert a.title == "red cap"  # surrounding blanks are not part of the title
    assert a.image == photos / "images" / "a.jpg"  # relative to the catalogue file
    assert a.image.is_file()
    assert a.attributes == {"category": "hat", "price": 9.99, "tags": ["summer", "sale"]}
    assert b.title == "蓝色羽绒服"
    assert b.attributes == {"colour": "blue"}
    # metadata() is what the index stores: title, image path and every attribute.
    assert a.metadata() == {"title": "red cap", "image": str(photos / "images" / "a.jpg"),
                            "category": "hat", "price": 9.99, "tags": ["summer", "sale"]}


def test_relative_paths_follow_the_catalogue_file_not_the_working_directory(
        photos: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    good, bad = read_catalog(write_jsonl(photos / "c.jsonl", [
        {"id": "a", "title": "cap", "image": "images/a.jpg"}]))
    assert bad == [] and good[0].image == photos / "images" / "a.jpg"
    # A catalogue named by a relative path: the stored photo path is still absolute, so that
    # search results name a file that opens from any working directory.
    monkeypatch.chdir(photos.parent)
    good, bad = read_catalog(Path(photos.name) / "c.jsonl")
    assert bad == [] and good[0].image == photos / "images" / "a.jpg" and good[0].image.is_absolute()
    assert good[0].metadata()["image"] == str(photos / "images" / "a.jpg")


def test_absolute_image_path_is_kept(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("photos") / "x.png"
    other.write_bytes(b"placeholder")
    sub = photos / "sub"
    sub.mkdir()
    good, bad = read_catalog(write_jsonl(sub / "catalog.jsonl", [
        {"id": "x", "title": "watch", "image": str(other)},
        {"id": "a", "title": "cap", "image": "../images/a.jpg"},
    ]))
    assert bad == []
    assert good[0].image == other
    assert good[1].image.resolve() == (photos / "images" / "a.jpg").resolve()


def test_jsonl_bad_rows_are_reported_with_line_numbers_and_reasons(photos: Path) -> None:
    cat = write_jsonl(photos / "catalog.jsonl", [
        {"id": "a", "title": "cap", "image": "images/a.jpg"},          # 1 good
        '{"id": "broken", "title": "cap", ',                            # 2 invalid JSON
        {"title": "no id", "image": "images/b.jpg"},                    # 3 missing id
        {"id": "a", "title": "again", "image": "images/b.jpg"},         # 4 duplicate of line 1
        {"id": "e", "title": "   ", "image": "images/b.jpg"},           # 5 blank title
        {"id": "f", "image": "images/b.jpg"},                           # 6 no title at all
        {"id": "g", "title": "bag"},                                    # 7 no image field
        {"id": "h", "title": "bag", "image": "images/missing.jpg"},     # 8 image file absent
        "",                                                             # 9 blank: skipped
        '["a", "list"]',                                                # 10 not an object
        {"id": "k", "title": "x" * (MAX_TEXT_BYTES + 1), "image": "images/c.jpg"},  # 11 too long
        {"id": "b", "title": "tote", "image": "images/b.jpg"},          # 12 good
    ])
    good, bad = read_catalog(cat)
    assert [(r.line, r.id) for r in good] == [(1, "a"), (12, "b")]
    got = reasons(bad)
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8, 10, 11]
    assert got[2].startswith("not valid JSON")
    assert got[3] == "missing id"
    assert "duplicate id" in got[4] and "line 1" in got[4]
    assert got[5] == "empty title" and got[6] == "empty title"
    assert got[7] == "missing image"
    assert "does not exist" in got[8] and "missing.jpg" in got[8]
    assert got[10] == "not a JSON object"
    assert str(MAX_TEXT_BYTES) in got[11]
    # The ids that were readable are carried for the report.
    ids = {b.line: b.id for b in bad}
    assert ids[2] is None and ids[3] is None and ids[4] == "a" and ids[8] == "h"
    assert str(next(b for b in bad if b.line == 8)).startswith("line 8 (id h): ")


def test_a_bad_row_does_not_claim_its_id(photos: Path) -> None:
    # Line 1 is rejected (no photo), so line 2 with the same id is the first good one.
    good, bad = read_catalog(write_jsonl(photos / "catalog.jsonl", [
        {"id": "a", "title": "cap", "image": "images/nope.jpg"},
        {"id": "a", "title": "cap", "image": "images/a.jpg"},
    ]))
    assert [(r.line, r.id) for r in good] == [(2, "a")]
    assert [b.line for b in bad] == [1]


def test_numeric_ids_are_text(photos: Path) -> None:
    good, bad = read_catalog(write_jsonl(photos / "catalog.jsonl", [
        {"id": 0, "title": "cap", "image": "images/a.jpg"},
        {"id": 17, "title": "bag", "image": "images/b.jpg"},
    ]))
    assert bad == []
    assert [r.id for r in good] == ["0", "17"]


def test_check_images_false_skips_the_file_check(photos: Path) -> None:
    good, bad = read_catalog(write_jsonl(photos / "catalog.jsonl", [
        {"id": "a", "title": "cap", "image": "images/not-yet.jpg"}]), check_images=False)
    assert bad == [] and good[0].image == photos / "images" / "not-yet.jpg"


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_good_and_bad_rows(photos: Path) -> None:
    cat = write_csv(photos / "catalog.csv", ["id", "title", "image", "category", "colour"], [
        ["a", "red cap", "images/a.jpg", "hat", "red"],         # line 2
        ["", "no id", "images/a.jpg", "hat", "red"],            # line 3
        ["a", "dup", "images/b.jpg", "hat", "red"],             # line 4
        ["d", "", "images/b.jpg", "bag", "blue"],               # line 5
        ["e", "tote", "", "bag", "blue"],                       # line 6
        ["f", "tote", "images/gone.jpg", "bag", "blue"],        # line 7
        ["b", "blue tote, large", str(photos / "images" / "b.jpg"), "bag", "blue"],  # line 8
    ])
    good, bad = read_catalog(cat)
    assert [(r.line, r.id) for r in good] == [(2, "a"), (8, "b")]
    assert good[0].attributes == {"category": "hat", "colour": "red"}
    assert good[0].image == photos / "images" / "a.jpg"
    assert good[1].title == "blue tote, large"  # a quoted comma stays in the field
    assert good[1].image == photos / "images" / "b.jpg"
    got = reasons(bad)
    assert got == {3: "missing id", 4: got[4], 5: "empty title", 6: "missing image", 7: got[7]}
    assert "duplicate id" in got[4] and "line 2" in got[4]
    assert "gone.jpg" in got[7] and "does not exist" in got[7]


def test_csv_line_numbers_count_physical_lines(photos: Path) -> None:
    # A quoted title spanning two lines and a blank line: the reported line numbers must
    # still point at the file's own lines (where each row starts), not at a row counter.
    text = ('id,title,image\n'
            'a,"cap,\nred",images/a.jpg\n'     # lines 2-3
            '\n'                               # line 4 (blank)
            'b,bag,images/missing.jpg\n'       # line 5
            'c,watch,images/c.jpg\n')          # line 6
    (photos / "catalog.csv").write_text(text, encoding="utf-8")
    good, bad = read_catalog(photos / "catalog.csv")
    assert [(r.id, r.line) for r in good] == [("a", 2), ("c", 6)]
    assert good[0].title == "cap,\nred"
    assert [(b.id, b.line) for b in bad] == [("b", 5)]


def test_csv_row_with_more_fields_than_the_header_is_bad(photos: Path) -> None:
    text = ('id,title,image,colour\n'
            'a,red, cap,images/a.jpg,red\n'   # unquoted comma: five fields
            'b,bag,images/b.jpg\n')           # a missing trailing attribute is fine
    (photos / "catalog.csv").write_text(text, encoding="utf-8")
    good, bad = read_catalog(photos / "catalog.csv")
    assert [(r.id, r.attributes) for r in good] == [("b", {"colour": None})]
    assert [b.line for b in bad] == [2] and "5 fields" in bad[0].reason


def test_csv_with_byte_order_mark(photos: Path) -> None:
    # Spreadsheet programs write a UTF-8 BOM before the header.
    (photos / "catalog.csv").write_bytes("\ufeffid,title,image\na,cap,images/a.jpg\n".encode())
    good, bad = read_catalog(photos / "catalog.csv")
    assert bad == [] and [r.id for r in good] == ["a"]


def test_missing_catalogue_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nowhere.jsonl"):
        read_catalog(tmp_path / "nowhere.jsonl")
