"""Search: a query (text, photo or both) -> served embedding -> FAISS top-k with filters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from xmsearch.client.embed import Embedder, read_image
from xmsearch.client.index import CatalogIndex, Hit
from xmsearch.errors import InputError


class Searcher:
    """Answers queries against one index through one server (fingerprints must agree)."""

    def __init__(self, index_dir: Path, embedder: Embedder, *, mmap: bool = False):
        self.index = CatalogIndex.open(Path(index_dir), mmap=mmap, read_only=True)
        self.embedder = embedder
        try:
            # Vectors of two different models are silently meaningless together: refuse.
            self.index.check_fingerprint(embedder.fingerprint)
        except BaseException:
            self.index.close()
            raise

    def search(self, text: str | None = None, image: bytes | str | Path | None = None, k: int = 10,
               filters: Mapping[str, str | Sequence[str]] | None = None) -> list[Hit]:
        """Top-k products for one query."""
        return self.search_many([text] if text is not None else None,
                                [image] if image is not None else None, k, filters)[0]

    def search_many(self, texts: Sequence[str] | None = None,
                    images: Sequence[bytes | str | Path] | None = None, k: int = 10,
                    filters: Mapping[str, str | Sequence[str]] | None = None) -> list[list[Hit]]:
        """Top-k for a batch of queries of one kind (embedded in batched requests)."""
        if k <= 0:
            raise InputError(f"k must be positive, got {k}")
        photos = [read_image(i) for i in images] if images is not None else None
        vectors = self.embedder.embed_queries(texts, photos)
        return self.index.search(vectors, k, filters)

    def close(self) -> None:
        self.index.close()


def parse_filters(items: Sequence[str]) -> dict[str, list[str]]:
    """``["colour=red", "colour=blue", "category=hat"]`` -> ``{"colour": [...], ...}``."""
    out: dict[str, list[str]] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise InputError(f"filter {item!r} is not FIELD=VALUE")
        out.setdefault(field.strip(), []).append(value.strip())
    return out
