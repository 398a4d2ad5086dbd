"""Reading a product catalogue (JSONL or CSV) into validated rows.

A row needs ``id``, ``title`` and ``image`` (a path relative to the catalogue file, or
absolute); every other field is kept as an attribute.  Bad rows are reported with their
line numbers and skipped, never raised: one broken line must not stop an ingest of a
million good ones.  Image *content* is checked later, where it is decoded.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from xmsearch.errors import InputError
from xmsearch.preprocess import MAX_TEXT_BYTES

RESERVED = ("id", "title", "image")


@dataclass
class CatalogRow:
    line: int
    id: str
    title: str
    image: Path
    attributes: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        return {"title": self.title, "image": str(self.image), **self.attributes}


def alt_titles(row: CatalogRow) -> list[str]:
    """The row's other titles (its ``alt_titles`` field: translations, synonym wordings), the
    non-empty strings of it; training reads them as extra text views, ingestion (with
    ``alt_titles``) into the stored vector."""
    return [t for t in row.attributes.get("alt_titles", []) or [] if isinstance(t, str) and t.strip()]


@dataclass
class BadRow:
    line: int
    id: str | None
    reason: str

    def __str__(self) -> str:
        ident = f" (id {self.id})" if self.id else ""
        return f"line {self.line}{ident}: {self.reason}"


def _records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path)
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, None, f"not valid JSON ({e.msg})"
                continue
            if not isinstance(rec, dict):
                yield i, None, "not a JSON object"
                continue
            yield i, rec, None


def _csv_records(path: Path) -> Iterator[tuple[int, dict | None, str | None]]:
    # utf-8-sig: spreadsheet exports start with a BOM, which would otherwise glue itself
    # to the first header name and make every row lack an "id".
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        end = reader.line_num
        for fields in reader:
            # A quoted field may span lines: report the line the row starts on, counted
            # in the file (a row counter drifts after blank lines and multi-line fields).
            start, end = end + 1, reader.line_num
            if not fields:
                continue  # blank line
            if len(fields) > len(header):
                yield start, None, (f"{len(fields)} fields but the header has {len(header)} "
                                    "(an unquoted comma?)")
                continue
            yield start, dict(zip(header, fields + [None] * (len(header) - len(fields)))), None


def read_catalog(path: Path, check_images: bool = True) -> tuple[list[CatalogRow], list[BadRow]]:
    """Parse and validate a catalogue; returns (good rows, bad rows with reasons)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"catalogue {path} does not exist")
    good: list[CatalogRow] = []
    bad: list[BadRow] = []
    seen: dict[str, int] = {}
    for line, rec, problem in _records(path):
        if problem:
            bad.append(BadRow(line, None, problem))
            continue
        raw_id = rec.get("id")
        # "is None", not "or": a numeric id 0 is an id.
        ident = "" if raw_id is None else str(raw_id).strip()
        title = rec.get("title")
        image = rec.get("image")
        if not ident:
            bad.append(BadRow(line, None, "missing id"))
            continue
        if ident in seen:
            bad.append(BadRow(line, ident, f"duplicate id (first seen on line {seen[ident]})"))
            continue
        if not isinstance(title, str) or not title.strip():
            bad.append(BadRow(line, ident, "empty title"))
            continue
        if len(title.encode("utf-8")) > MAX_TEXT_BYTES:
            bad.append(BadRow(line, ident, f"title over {MAX_TEXT_BYTES} bytes"))
            continue
        if not isinstance(image, str) or not image.strip():
            bad.append(BadRow(line, ident, "missing image"))
            continue
        img = Path(image)
        if not img.is_absolute():
            # Absolute, so that what the index stores (metadata()) still names the photo when
            # a search runs from another working directory (result sheets, user interfaces).
            img = Path(os.path.abspath(path.parent / img))
        if check_images and not img.is_file():
            bad.append(BadRow(line, ident, f"image file {img} does not exist"))
            continue
        seen[ident] = line
        attrs = {k: v for k, v in rec.items() if k not in RESERVED}
        good.append(CatalogRow(line, ident, title.strip(), img, attrs))
    return good, bad
