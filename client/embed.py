"""Embedding through the served ensembles: the one place that knows which ensemble a
query kind goes to and how its tensors are packed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from xmsearch import spec as S
from xmsearch.client.triton import TritonClient
from xmsearch.errors import InputError, ServerError


def _bytes_column(values: Sequence[bytes | str]) -> np.ndarray:
    col = np.empty((len(values), 1), dtype=np.object_)
    for i, v in enumerate(values):
        col[i, 0] = v.encode("utf-8") if isinstance(v, str) else bytes(v)
    return col


def read_image(image: bytes | str | Path) -> bytes:
    """Image bytes from bytes or a file path (InputError naming a missing file)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    path = Path(image)
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image file {path}: {e.strerror or e}") from None


def stack_rows(vectors: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """Row blocks ``[n_i, dim]`` stacked into one ``[sum n_i, dim]`` array; ``[0, dim]`` for none."""
    return np.concatenate(vectors) if len(vectors) else np.zeros((0, dim), np.float32)


def embed_isolating(embed: Callable[[list[int]], np.ndarray], n: int, dim: int
                    ) -> tuple[list[int], np.ndarray, dict[int, InputError]]:
    """Embed rows ``0..n-1`` with ``embed(row_indices)`` in one request; when the server
    refuses it (an InputError: one bad text or photo fails the whole request), send each row
    alone, so that only the bad rows are lost.  Returns the kept rows, their vectors
    ``[len(kept), dim]``, and each refused row's error."""
    rows = list(range(n))
    try:
        return rows, embed(rows), {}
    except InputError as exc:
        if n == 1:
            return [], stack_rows([], dim), {0: exc}
    kept, vectors, refused = [], [], {}
    for i in rows:
        try:
            vectors.append(embed([i]))
            kept.append(i)
        except InputError as exc:
            refused[i] = exc
    return kept, stack_rows(vectors, dim), refused


class Embedder:
    """Embeds catalogue items and queries with the ensembles of one Triton server."""

    def __init__(self, url: str = "localhost:8001", *, client: TritonClient | None = None,
                 batch_size: int | None = None, max_in_flight: int = 4, **client_options):
        self.client = client or TritonClient(url, **client_options)
        self.url = url
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self._params: dict[str, str] | None = None

    def check_ready(self, models: Sequence[str] = S.ENSEMBLES) -> None:
        self.client.check_ready(list(models))

    def _parameters(self) -> dict[str, str]:
        if self._params is None:
            params = self.client.model_parameters(S.ITEM)
            if S.FINGERPRINT_PARAMETER not in params:
                raise ServerError(f"model {S.ITEM!r} at {self.url} carries no {S.FINGERPRINT_PARAMETER} "
                                  "parameter: is this an xmsearch model repository?")
            self._params = params
        return self._params

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the models behind the served ensembles."""
        return self._parameters()[S.FINGERPRINT_PARAMETER]

    @property
    def dim(self) -> int:
        return int(self._parameters()[S.EMBED_DIM_PARAMETER])

    def _run(self, model: str, inputs: dict[str, np.ndarray], progress: bool,
             outputs: Sequence[str] = (S.EMBEDDING,)) -> np.ndarray:
        """The outputs side by side, ``[n, dim * len(outputs)]``."""
        out = self.client.infer_batched(model, inputs, list(outputs), batch_size=self.batch_size,
                                        max_in_flight=self.max_in_flight, progress=progress)
        return out[outputs[0]] if len(outputs) == 1 else np.hstack([out[o] for o in outputs])

    @property
    def serves_photo_vectors(self) -> bool:
        """Whether the item ensemble returns items' photo-side vectors (``PHOTO_EMBEDDING``;
        model repositories exported before it did not)."""
        return S.PHOTO_EMBEDDING in self.client.model_info(S.ITEM).outputs

    def embed_items(self, titles: Sequence[str], images: Sequence[bytes], progress: bool = False,
                    *, photo: bool = False) -> np.ndarray:
        """Item vectors (title + photo, passage role) for catalogue rows, ``[n, dim]``; with
        ``photo``, each row followed by the item's photo-side vector, ``[n, 2 * dim]``."""
        if len(titles) != len(images):
            raise InputError(f"{len(titles)} titles but {len(images)} images")
        return self._run(S.ITEM, {S.TEXT: _bytes_column(titles), S.IMAGE: _bytes_column(images)}, progress,
                         (S.EMBEDDING, S.PHOTO_EMBEDDING) if photo else (S.EMBEDDING,))

    def embed_queries(self, texts: Sequence[str] | None = None, images: Sequence[bytes] | None = None,
                      progress: bool = False) -> np.ndarray:
        """Query vectors: text only, image only, or (text, image) pairs; only the needed branches run."""
        if texts is None and images is None:
            raise InputError("a query needs a text, an image or both")
        if texts is not None and images is not None:
            if len(texts) != len(images):
                raise InputError(f"{len(texts)} query texts but {len(images)} query images")
            return self._run(S.QUERY_TEXT_IMAGE, {S.TEXT: _bytes_column(texts),
                                                  S.IMAGE: _bytes_column(images)}, progress)
        if texts is not None:
            return self._run(S.QUERY_TEXT, {S.TEXT: _bytes_column(texts)}, progress)
        return self._run(S.QUERY_IMAGE, {S.IMAGE: _bytes_column(images)}, progress)

    def close(self) -> None:
        self.client.close()
