"""Where a catalogue index lives: a directory (FAISS + SQLite, :mod:`xmsearch.client.index`)
or a Milvus collection (``milvus:URI[#COLLECTION]``, :mod:`xmsearch.client.milvus`).

Ingestion, search and the command line take either and call these four functions; the two
index classes share the interface those callers use.
"""

from __future__ import annotations

import os
from pathlib import Path

from xmsearch.client.index import MANIFEST_NAME, CatalogIndex
from xmsearch.client.milvus import MilvusIndex, MilvusLocation, is_milvus
from xmsearch.errors import InputError

__all__ = ["Location", "create_index", "index_exists", "open_index", "parse_location"]

Location = Path | MilvusLocation
# The FAISS factory that means "exact search"; a Milvus collection maps it to FLAT.
_EXACT = "Flat"


def parse_location(text: str | os.PathLike[str] | MilvusLocation) -> Location:
    """``milvus:URI[#COLLECTION]`` as a :class:`MilvusLocation`, anything else as a directory.

    Usable as an argparse ``type``: a Milvus URI must not go through ``Path``, which would
    fold the ``//`` of ``http://``."""
    if isinstance(text, MilvusLocation):
        return text
    if isinstance(text, str) and is_milvus(text):
        return MilvusLocation.parse(text)
    return Path(text)


def index_exists(location: Location) -> bool:
    """Whether an index is already at ``location``."""
    loc = parse_location(location)
    if isinstance(loc, MilvusLocation):
        return MilvusIndex.exists(loc)
    return (loc / MANIFEST_NAME).exists()


def open_index(location: Location, *, read_only: bool = False, mmap: bool = False,
               gpu: bool = False) -> CatalogIndex | MilvusIndex:
    """Open the index at ``location`` (see :meth:`CatalogIndex.open`)."""
    loc = parse_location(location)
    cls = MilvusIndex if isinstance(loc, MilvusLocation) else CatalogIndex
    return cls.open(loc, read_only=read_only, mmap=mmap, gpu=gpu)


def create_index(location: Location, dim: int, *, fingerprint: str, factory: str = _EXACT,
                 gpu: bool = False, photo_vectors: bool = False, photo_views: int = 0,
                 alt_titles: bool = False) -> CatalogIndex | MilvusIndex:
    """Create an index at ``location``.  ``factory`` is a FAISS index_factory string for a
    directory; a Milvus collection takes ``Flat`` (exact, Milvus' FLAT) or
    ``milvus:INDEX_TYPE`` (HNSW, IVF_FLAT, AUTOINDEX, ...: built by Milvus with its defaults)."""
    loc = parse_location(location)
    if not isinstance(loc, MilvusLocation):
        return CatalogIndex.create(loc, dim, fingerprint=fingerprint, factory=factory, gpu=gpu,
                                   photo_vectors=photo_vectors, photo_views=photo_views, alt_titles=alt_titles)
    if gpu:
        raise InputError(f"{loc}: --gpu builds a FAISS index on this machine; a Milvus collection "
                         "uses the server's GPUs through a GPU index type (--factory milvus:GPU_CAGRA)")
    if factory == _EXACT:
        index_type = "FLAT"
    elif factory.startswith("milvus:") and factory[len("milvus:"):]:
        index_type = factory[len("milvus:"):]
    else:
        raise InputError(f"{loc}: factory {factory!r} is a FAISS index; a Milvus collection takes "
                         "Flat (exact search) or milvus:INDEX_TYPE (e.g. milvus:HNSW)")
    return MilvusIndex.create(loc, dim, fingerprint=fingerprint, photo_vectors=photo_vectors,
                              photo_views=photo_views, alt_titles=alt_titles, index_type=index_type)
