"""The python-backend models served by Triton.

Each generated ``<member>/1/model.py`` in the model repository is a two-line shim that
imports one class from here, so the serving code is ordinary, importable, tested Python.

Contract with Triton's python backend:
- ``execute`` returns exactly one ``InferenceResponse`` per request, in order;
- a bad request gets ``InferenceResponse(error=TritonError(..., INVALID_ARG))`` whose
  message starts with this model's name (an ensemble error otherwise hides which step
  refused the input), and the other requests in the same batch are answered normally;
- exceptions leave only ``initialize`` (a model that cannot load must not serve).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from xmsearch import spec as S
from xmsearch.errors import InputError
from xmsearch.preprocess import ImagePreprocessor, TextPreprocessor, decode_text


def _pb():
    # Only importable inside the python-backend stub.
    import triton_python_backend_utils as pb_utils

    return pb_utils


class _Base:
    def initialize(self, args: dict) -> None:
        self.config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.folder = Path(args["model_repository"]) / args["model_version"]
        self.params = {k: v["string_value"] for k, v in self.config.get("parameters", {}).items()}
        self.pb = _pb()

    def _error(self, message: str):
        pb = self.pb
        return pb.InferenceResponse(error=pb.TritonError(f"{self.name}: {message}",
                                                         pb.TritonError.INVALID_ARG))

    def _answer_each(self, requests, outputs_of) -> list:
        """One response per request: ``outputs_of(request)`` gives its output tensors;
        an InputError becomes that request's INVALID_ARG error, the others carry on."""
        out = []
        for request in requests:
            try:
                tensors = outputs_of(request)
            except InputError as e:
                out.append(self._error(str(e)))
                continue
            out.append(self.pb.InferenceResponse(output_tensors=tensors))
        return out

    def _bytes_rows(self, request, name: str) -> list:
        tensor = self.pb.get_input_tensor_by_name(request, name)
        if tensor is None:
            raise InputError(f"input {name} is missing")
        arr = tensor.as_numpy()
        if arr.dtype != np.object_ or arr.ndim != 2 or arr.shape[1] != 1:
            raise InputError(f"{name} must be BYTES of shape [batch, 1], got {arr.dtype} {list(arr.shape)}")
        return list(arr[:, 0])

    def _text_rows(self, request) -> list[str]:
        """The request's ``TEXT`` rows, each checked by ``decode_text``."""
        rows = self._bytes_rows(request, S.TEXT)
        return [decode_text(r, what=f"{S.TEXT}[{i}]") for i, r in enumerate(rows)]


class _TextStep(_Base):
    """Reads TEXT (UTF-8 bytes) into INPUT_IDS, ATTENTION_MASK, padded to a 16-token bucket."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.role = self.params.get("role", "query")
        self.text_pre = TextPreprocessor.from_dir(self.folder)

    def _tokens(self, request) -> list:
        ids, mask = self.text_pre.encode(self._text_rows(request), self.role)
        return [self.pb.Tensor("INPUT_IDS", ids), self.pb.Tensor("ATTENTION_MASK", mask)]


class _ImageStep(_Base):
    """Reads IMAGE (encoded bytes) into PIXEL_VALUES [3, H, W] uint8."""

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        self.image_pre = ImagePreprocessor.from_dir(self.folder)

    def _pixels(self, request) -> list:
        rows = self._bytes_rows(request, "IMAGE")
        pixels = np.stack([self.image_pre(r, what=f"IMAGE[{i}]") for i, r in enumerate(rows)])
        return [self.pb.Tensor("PIXEL_VALUES", pixels)]


class TokenizerModel(_TextStep):
    """``tokenizer_query``: TEXT -> INPUT_IDS, ATTENTION_MASK."""

    def execute(self, requests):
        return self._answer_each(requests, self._tokens)


class ImagePreprocessModel(_ImageStep):
    """``image_preprocess``: IMAGE -> PIXEL_VALUES."""

    def execute(self, requests):
        return self._answer_each(requests, self._pixels)


class JointPreprocessModel(_TextStep, _ImageStep):
    """``joint_preprocess`` / ``item_preprocess``: TEXT, IMAGE -> ids, mask and pixels.

    Both inputs are checked before the ensemble starts its two branches, so a refusal
    never leaves a sibling step running (see ``xmsearch.spec.ensemble_specs``).
    """

    def execute(self, requests):
        return self._answer_each(requests, lambda r: self._tokens(r) + self._pixels(r))


def session_options(model: str, params: dict[str, str]):
    """ONNX Runtime session options of an ONNX member from its config ``parameters``.

    ``intra_op_threads`` (0: ONNX Runtime's choice) and ONNX Runtime's own switches, passed
    through when present: idle intra-op workers busy-wait by default (``allow_spinning``),
    which with several members sharing few cores takes the CPU another member needs;
    ``force_spinning_stop`` keeps the spinning inside a run (between its parallel sections)
    and puts the workers to sleep when the run returns.
    """
    from xmsearch.onnxrt import SPIN_ENTRIES, cpu_session_options

    threads = count_parameter(model, params, "intra_op_threads")
    spin = {key: params[key] for key in SPIN_ENTRIES if key in params}
    for key, value in spin.items():
        if value not in ("0", "1"):
            raise ValueError(f"{model}: parameter {key} must be 0 or 1, got {value!r}")
    return cpu_session_options(threads, **spin)


def count_parameter(model: str, params: dict[str, str], key: str, noun: str = "count") -> int:
    """A count parameter of an ONNX member's config, 0 when absent: ``intra_op_threads`` and
    ``spin_intra_op_threads`` (threads), and the row counts of ``OnnxModel``: ``spin_max_rows``
    (runs of at most this many rows go to a second session whose workers spin inside the
    run) and ``max_rows_per_run`` (larger merged batches run as several ONNX Runtime runs of
    nearly equal size; 0: no limit)."""
    value = params.get(key, "0")
    if not value.isdigit():
        raise ValueError(f"{model}: parameter {key} must be a {noun} (0 or more), got {value!r}")
    return int(value)


def lone_session_options(model: str, params: dict[str, str]):
    """Options of the one-row session: spinning inside a run only, on ``spin_intra_op_threads``
    threads when the config has it (a member laid out as several single-threaded instances
    still runs a lone query on every core), else on the member's own ``intra_op_threads``."""
    lone = {**params, "allow_spinning": "1", "force_spinning_stop": "1"}
    if threads := count_parameter(model, params, "spin_intra_op_threads"):  # 0: intra_op_threads
        lone["intra_op_threads"] = str(threads)
    return session_options(model, lone)


class OnnxModel(_Base):
    """Runs ``model.onnx`` with ONNX Runtime (the cpu target's encoders and fusion).

    Requests in one execute() are concatenated along the batch axis when their other
    dims agree (the dynamic batcher only groups equal shapes, but be safe) so ONNX
    Runtime sees the merged batch: that is where dynamic batching pays on CPU.

    With ``spin_max_rows`` N > 0 in the config, merged batches of at most N rows (a lone
    query) run in a second session of the same graph whose intra-op workers busy-wait
    between the parallel sections of a run instead of sleeping, and larger ones in the
    configured session: a lone query gets the lower latency of spinning, while under load,
    when the members run at the same time and the batches grow, nobody spins against them.
    The two sessions share the graph's large weights (``shared_initializers``).  The second
    session's thread count is ``spin_intra_op_threads`` when set (``lone_session_options``).

    With ``max_rows_per_run`` N > 0, a merged batch of more than N rows runs as several runs
    of at most N rows (``run``): ONNX Runtime's arena keeps the largest run's activations for
    the life of the session, which for an image encoder at 32 rows is hundreds of MB.
    """

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        import onnxruntime as ort

        from xmsearch.onnxrt import external_data_file, shared_initializers

        path = str(self.folder / "model.onnx")
        self.spin_max_rows = count_parameter(self.name, self.params, "spin_max_rows", "row count")
        self.max_rows_per_run = count_parameter(self.name, self.params, "max_rows_per_run", "row count")
        option_sets = [session_options(self.name, self.params)]
        if self.spin_max_rows:
            option_sets.append(lone_session_options(self.name, self.params))
        # One session reads its weights from the file; two share the large ones, which must
        # outlive the sessions.  Weights stored beside the graph are mapped from their file
        # either way: every instance of the member then reads the same pages.
        shares = len(option_sets) > 1 or external_data_file(path).exists()
        self.shared = shared_initializers(path) if shares else {}
        for opts in option_sets:
            for name, value in self.shared.items():
                opts.add_initializer(name, value)
        sessions = [ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
                    for opts in option_sets]
        self.session = sessions[0]
        self.lone_session = sessions[-1]
        # The graph's own tensors: a member's config may add some its stub answers itself
        # (TextEncoderModel's TEXT and EMBEDDING).
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def session_for(self, rows: int):
        """The session that runs a merged batch of ``rows`` rows."""
        return self.lone_session if rows <= self.spin_max_rows else self.session

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The outputs for a merged batch: one ONNX Runtime run, or with ``max_rows_per_run``
        N > 0 and more rows than N, runs of at most N rows concatenated (every run in the
        session the whole batch's size chose)."""
        rows = len(next(iter(feed.values())))
        session = self.session_for(rows)
        if not self.max_rows_per_run or rows <= self.max_rows_per_run:
            return session.run(self.outputs, feed)
        parts = -(-rows // self.max_rows_per_run)
        bounds = np.linspace(0, rows, parts + 1).round().astype(int)
        runs = [session.run(self.outputs, {n: a[lo:hi] for n, a in feed.items()})
                for lo, hi in zip(bounds[:-1], bounds[1:])]
        return [np.concatenate(outs) for outs in zip(*runs)]

    def execute(self, requests):
        feeds = {i: {name: self.pb.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                 for i, request in enumerate(requests)}
        return self._run_merged([None] * len(requests), feeds,
                                lambda merged, idx: dict(zip(self.outputs, self.run(merged))),
                                lambda i: self.outputs)

    def _run_merged(self, results: list, feeds: dict[int, dict[str, np.ndarray]], compute, names_of) -> list:
        """Answer the requests of ``feeds`` (index -> input arrays) into ``results``: requests
        whose inputs agree beyond the batch axis are concatenated, ``compute(merged, indices)``
        gives the merged batch's outputs by name, and request ``i`` gets its rows of the outputs
        ``names_of(i)``.  A failed run answers its requests with the error; the others carry on."""
        pb = self.pb
        groups: dict[tuple, list[int]] = {}
        for i, feed in feeds.items():
            groups.setdefault(tuple((n, a.shape[1:]) for n, a in sorted(feed.items())), []).append(i)
        for idx in groups.values():
            merged = {n: np.concatenate([feeds[i][n] for i in idx]) for n in feeds[idx[0]]}
            try:
                out = compute(merged, idx)
            except Exception as e:  # ORT raises its own exception types; answer, do not crash
                for i in idx:
                    results[i] = self._error(f"inference failed: {e}")
                continue
            start = 0
            for i in idx:
                n = len(next(iter(feeds[i].values())))
                results[i] = pb.InferenceResponse(output_tensors=[
                    pb.Tensor(name, np.ascontiguousarray(out[name][start:start + n]))
                    for name in names_of(i) if name in out])
                start += n
        return results


class TextEncoderModel(OnnxModel):
    """``text_encoder`` on the cpu target: ``OnnxModel`` over the encoder graph that also
    answers query text end to end, so that ``query_text`` is one step instead of three stub
    round trips (``xmsearch.spec.ensemble_specs``).

    A request carries either ``INPUT_IDS`` and ``ATTENTION_MASK`` (the ``item`` and
    ``query_text_image`` ensembles, tokenized by their first step) or ``TEXT``
    (``query_text``), tokenized here in the config's ``role``; the dynamic batcher only
    groups requests with the same inputs present.  A request gets the outputs it asks for
    among ``TOKEN_STATES`` and, for text, ``EMBEDDING`` from ``query_head.onnx`` (the
    ``fusion_text`` graph) run on the same batch's states and mask; ids and mask get their
    states only (a client that names no outputs asks for all of them, and the head is not part
    of that path).
    """

    def initialize(self, args: dict) -> None:
        super().initialize(args)
        import onnxruntime as ort

        self.role = self.params.get("role", "query")
        self.text_pre = TextPreprocessor.from_dir(self.folder)
        self.head = ort.InferenceSession(str(self.folder / S.QUERY_HEAD_FILE),
                                         session_options(self.name, self.params),
                                         providers=["CPUExecutionProvider"])

    def _given_tokens(self, request) -> tuple[np.ndarray, np.ndarray]:
        get = self.pb.get_input_tensor_by_name
        ids, mask = get(request, S.INPUT_IDS), get(request, S.ATTENTION_MASK)
        if ids is None or mask is None:
            raise InputError(f"send {S.TEXT}, or {S.INPUT_IDS} with {S.ATTENTION_MASK}")
        ids, mask = ids.as_numpy(), mask.as_numpy()
        if ids.shape != mask.shape:
            raise InputError(f"{S.INPUT_IDS} {list(ids.shape)} and {S.ATTENTION_MASK} "
                             f"{list(mask.shape)} must have the same shape")
        return ids, mask

    def _texts(self, request) -> list[str]:
        if self.pb.get_input_tensor_by_name(request, S.INPUT_IDS) is not None:
            raise InputError(f"send {S.TEXT} or {S.INPUT_IDS}, not both")
        return self._text_rows(request)

    def _tokens(self, requests, results: list) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], set[int]]:
        """(ids, mask) of each request that passed its checks, and which of them came as text;
        a refusal goes to ``results``.  The texts of all text requests are tokenized together:
        one padded width, one run."""
        tokens, texts = {}, {}
        for i, request in enumerate(requests):
            try:
                if self.pb.get_input_tensor_by_name(request, S.TEXT) is None:
                    tokens[i] = self._given_tokens(request)
                else:
                    texts[i] = self._texts(request)
            except InputError as e:
                results[i] = self._error(str(e))
        if texts:
            ids, mask = self.text_pre.encode([t for rows in texts.values() for t in rows], self.role)
            start = 0
            for i, rows in texts.items():
                tokens[i] = ids[start:start + len(rows)], mask[start:start + len(rows)]
                start += len(rows)
        return tokens, set(texts)

    def execute(self, requests):
        results: list = [None] * len(requests)
        tokens, from_text = self._tokens(requests, results)
        feeds = {i: {S.INPUT_IDS: ids, S.ATTENTION_MASK: mask} for i, (ids, mask) in tokens.items()}
        wanted = {i: [n for n in requests[i].requested_output_names() or [S.TOKEN_STATES, S.EMBEDDING]
                      if n == S.TOKEN_STATES or i in from_text] for i in tokens}

        def compute(merged: dict[str, np.ndarray], idx: list[int]) -> dict[str, np.ndarray]:
            out = {S.TOKEN_STATES: self.run(merged)[0]}
            if any(S.EMBEDDING in wanted[i] for i in idx):
                out[S.EMBEDDING] = self.head.run([S.EMBEDDING], {S.TOKEN_STATES: out[S.TOKEN_STATES],
                                                                 S.ATTENTION_MASK: merged[S.ATTENTION_MASK]})[0]
            return out

        return self._run_merged(results, feeds, compute, wanted.__getitem__)


SHIMS = {
    S.TEXT_ENCODER: "TextEncoderModel",  # python-backend on the cpu target only
    S.TOKENIZER_QUERY: "TokenizerModel",
    S.IMAGE_PREPROCESS: "ImagePreprocessModel",
    S.JOINT_PREPROCESS: "JointPreprocessModel",
    S.ITEM_PREPROCESS: "JointPreprocessModel",
}


def shim_source(model_name: str, cls: str | None = None) -> str:
    """The model.py written into the repository for a python-backend member: its class from
    ``SHIMS`` (``OnnxModel`` for the cpu target's other encoders and the fusion members), or
    ``cls``."""
    cls = cls or SHIMS.get(model_name, "OnnxModel")
    return (f'"""Triton python-backend entry point of {model_name!r} (generated by xmsearch export).\n\n'
            f'The implementation is xmsearch.triton_models.{cls}; this file only names it.\n"""\n'
            f"from xmsearch.triton_models import {cls} as TritonPythonModel  # noqa: F401\n")
