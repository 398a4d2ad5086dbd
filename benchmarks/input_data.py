"""perf_analyzer input-data files built from a catalogue or a query log.

perf_analyzer replays the ``"data"`` entries of a JSON file round-robin, one entry per
request (batch 1).  Each entry names every input tensor of the model.  Our ensembles take
BYTES tensors of shape ``[1]`` (batch dimension excluded):

* ``TEXT``  -- written as a plain JSON string (``{"content": ["red shirt"], "shape": [1]}``);
* ``IMAGE`` -- the real encoded file bytes (JPEG/PNG/WebP), base64-encoded.  For BYTES
  tensors perf_analyzer expects the *serialised* form inside ``b64``: each element is a
  4-byte little-endian length followed by its bytes, exactly as Triton's wire format.

Sources: ``catalog.jsonl`` / ``.csv`` rows (``title``, ``image``; image paths relative to
the file) or ``queries.jsonl`` rows (``text`` and/or ``image``).  A folder is accepted and
searched for ``queries.jsonl`` then ``catalog.jsonl`` / ``catalog.csv``.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

import numpy as np

from xmsearch import spec
from xmsearch.errors import InputError

log = logging.getLogger(__name__)

Kind = Literal["text", "image", "text_image", "item"]

#: Which ensemble each input-data kind exercises.
KIND_MODEL: dict[str, str] = {
    "text": spec.QUERY_TEXT,
    "image": spec.QUERY_IMAGE,
    "text_image": spec.QUERY_TEXT_IMAGE,
    "item": spec.ITEM,
}
#: Which tensors each kind must fill.
KIND_TENSORS: dict[str, tuple[str, ...]] = {
    "text": (spec.TEXT,),
    "image": (spec.IMAGE,),
    "text_image": (spec.TEXT, spec.IMAGE),
    "item": (spec.TEXT, spec.IMAGE),
}

_TEXT_KEYS = ("text", "query", "title")
_IMAGE_KEYS = ("image", "image_path", "image_file")
_QUERY_NAMES = ("queries.jsonl",)
_CATALOGUE_NAMES = ("catalog.jsonl", "catalogue.jsonl", "catalog.csv", "catalogue.csv")


@dataclass(frozen=True)
class Record:
    """One query or product: its text and the local path of its image, either optional.

    ``kind`` is the query log's own label (``text``/``image``/``text_image``) when it has one.
    """

    text: str | None
    image: Path | None
    kind: str | None = None


def resolve_source(source: Path, kind: str | None = None) -> Path:
    """Return the JSONL/CSV file behind ``source`` (a file, or a folder holding one).

    In a folder, query kinds prefer ``queries.jsonl`` and ``item`` prefers the catalogue:
    real queries are shorter and differently worded than product titles.
    """
    source = Path(source)
    if source.is_dir():
        names = _CATALOGUE_NAMES + _QUERY_NAMES if kind == "item" else _QUERY_NAMES + _CATALOGUE_NAMES
        for name in names:
            if (source / name).is_file():
                return source / name
        raise InputError(f"input data: folder {source} holds none of {', '.join(names)}; "
                         "pass the catalogue or queries file itself")
    if not source.is_file():
        raise InputError(f"input data: {source} does not exist; pass a catalog.jsonl, "
                         "catalog.csv or queries.jsonl file (or its folder)")
    return source


def _rows(path: Path) -> Iterable[dict]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            yield from csv.DictReader(fh)
        return
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"input data: {path} line {lineno} is not JSON ({e.msg}); "
                                 "fix or remove that line") from e
            if not isinstance(row, dict):
                raise InputError(f"input data: {path} line {lineno} is not a JSON object")
            yield row


def _first(row: dict, keys: tuple[str, ...]) -> str | None:
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def load_records(source: Path, kind: str | None = None) -> list[Record]:
    """Read texts and local image paths from a catalogue or queries file (or its folder).

    Image paths are resolved against the file's folder; URLs are skipped (benchmarks run
    offline and must send the same bytes every run), with a log line saying how many.
    """
    path = resolve_source(source, kind)
    records: list[Record] = []
    skipped_urls = 0
    for row in _rows(path):
        text = _first(row, _TEXT_KEYS)
        image_ref = _first(row, _IMAGE_KEYS)
        image: Path | None = None
        if image_ref is not None:
            if "://" in image_ref:
                skipped_urls += 1
            else:
                candidate = Path(image_ref)
                image = candidate if candidate.is_absolute() else path.parent / candidate
        row_kind = row.get("kind")
        records.append(Record(text=text, image=image, kind=row_kind if isinstance(row_kind, str) else None))
    if skipped_urls:
        log.info("input data: skipped %d image URLs in %s (only local files are sent)", skipped_urls, path)
    return records


def bytes_element(payload: bytes) -> dict:
    """A BYTES tensor of shape [1] holding ``payload``, in perf_analyzer's b64 form."""
    serialised = struct.pack("<I", len(payload)) + payload
    return {"content": {"b64": base64.b64encode(serialised).decode("ascii")}, "shape": [1]}


def text_element(text: str) -> dict:
    """A BYTES tensor of shape [1] holding one UTF-8 string."""
    return {"content": [text], "shape": [1]}


def tensor_element(array: np.ndarray) -> dict:
    """A numeric tensor (one row, no batch axis) as raw little-endian bytes in b64, with its shape."""
    array = np.ascontiguousarray(array)
    if array.dtype == np.object_:
        raise InputError("input data: tensor_element takes numeric arrays; use text_element/bytes_element")
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
    return {"content": {"b64": base64.b64encode(data).decode("ascii")}, "shape": list(array.shape)}


def write_tensor_input_data(path: Path, rows: Sequence[Mapping[str, np.ndarray]]) -> Path:
    """perf_analyzer ``--input-data`` JSON for a member model from real input rows.

    Each row maps tensor names to arrays without the batch axis (shapes may differ
    between rows along dynamic axes, e.g. sequence length).
    """
    if not rows:
        raise InputError(f"input data: no rows to write into {path}")
    document = {"data": [{name: tensor_element(arr) for name, arr in row.items()} for row in rows]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document), encoding="utf-8")
    tmp.replace(path)
    return path


def build_input_data(records: Iterable[Record], kind: Kind, max_entries: int = 256) -> dict:
    """Build the ``{"data": [...]}`` document for ``kind`` from ``records``.

    Records missing a tensor the kind needs are skipped; unreadable images are skipped
    with a log line.  When records carry a query ``kind`` and some match ``kind``, only
    those are used (a text+image query's text, e.g. "in orange", is no text query).
    Raises :class:`InputError` when nothing usable is left.
    """
    records = list(records)
    if any(r.kind == kind for r in records):
        records = [r for r in records if r.kind == kind]
    if kind not in KIND_TENSORS:
        raise InputError(f"input data: unknown kind {kind!r}; use one of {', '.join(KIND_TENSORS)}")
    if max_entries < 1:
        raise InputError(f"input data: max_entries must be >= 1, got {max_entries}")
    needs = KIND_TENSORS[kind]
    entries: list[dict] = []
    unreadable = 0
    for record in records:
        if len(entries) >= max_entries:
            break
        entry: dict = {}
        if spec.TEXT in needs:
            if not record.text:
                continue
            entry[spec.TEXT] = text_element(record.text)
        if spec.IMAGE in needs:
            if record.image is None:
                continue
            try:
                payload = record.image.read_bytes()
            except OSError:
                unreadable += 1
                continue
            entry[spec.IMAGE] = bytes_element(payload)
        entries.append(entry)
    if unreadable:
        log.warning("input data: %d image files could not be read and were skipped", unreadable)
    if not entries:
        raise InputError(f"input data: no record has the {' + '.join(needs)} that kind {kind!r} needs "
                         f"({unreadable} unreadable images); check the catalogue's title/image columns")
    return {"data": entries}


def write_input_data(path: Path, source: Path, kind: Kind, max_entries: int = 256) -> Path:
    """Write perf_analyzer's ``--input-data`` JSON for ``kind`` from ``source``; return ``path``."""
    document = build_input_data(load_records(source, kind), kind, max_entries=max_entries)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    tmp.replace(path)
    return path
