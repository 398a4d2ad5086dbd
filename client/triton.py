"""gRPC client for models served by Triton: one request, batched requests, coalesced rows.

Generic over models: callers name a model and pass tensors by name.  Three layers:

* :meth:`TritonClient.infer` sends one request, retrying only when the server is
  unreachable, says UNAVAILABLE, or has the model unloaded while it shuts down (never a
  request it rejected), with exponential backoff and jitter, and turns server errors
  into the project's exceptions;
* :meth:`TritonClient.infer_batched` splits N rows into requests of at most the model's
  ``max_batch_size``, keeps several in flight and returns the rows in input order;
* :class:`Coalescer` merges single-row calls from many threads into one request, for
  online serving code that receives one query at a time.

:class:`AsyncTritonClient` offers the same ``infer`` / ``infer_batched`` on asyncio.

Input conventions: the first axis of every tensor is the batch.  ``bytes``/``str`` lists
become BYTES tensors of shape ``[N, 1]`` (the project's ``dims: [1]`` convention), numeric
arrays are cast to the dtype the model declares when the cast is safe, and an input whose
value is ``None`` is not sent (optional inputs).
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcclient_aio
from tritonclient.grpc import model_config_pb2
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from xmsearch.errors import InputError, ServerError, XmsearchError, for_caller

log = logging.getLogger(__name__)

DEFAULT_URL = "localhost:8001"
_INT32_MAX = 2**31 - 1
_UNAVAILABLE = "UNAVAILABLE"
_INVALID_ARGUMENT = "INVALID_ARGUMENT"
_DEADLINE = "DEADLINE_EXCEEDED"
_NOT_FOUND = "NOT_FOUND"
# Text of gRPC's own connection failures (as opposed to a server answering UNAVAILABLE).
_CONNECTION_HINTS = ("failed to connect", "connection refused", "socket closed",
                     "connection reset", "dns resolution failed", "broken pipe", "goaway")


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    Attempt ``k`` (0-based) sleeps a random time in ``[cap/2, cap]`` with
    ``cap = min(max_backoff_s, backoff_s * 2**k)``; jitter keeps many clients that lost
    the same server from reconnecting in lockstep.
    """

    retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 2.0

    def delay(self, attempt: int) -> float:
        cap = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return random.uniform(cap / 2, cap)


def _status(exc: InferenceServerException) -> str:
    # tritonclient reports gRPC codes as "StatusCode.NAME"; server-side errors may be None.
    return (exc.status() or "").rsplit(".", 1)[-1]


def _is_retryable(exc: InferenceServerException) -> bool:
    status, message = _status(exc), exc.message() or ""
    if status == _UNAVAILABLE:
        # Triton also answers UNAVAILABLE for an API restricted to callers with a header
        # (--grpc-restricted-protocol): a refusal that no retry will change.
        return "protocol is restricted" not in message
    # A stopping server (rolling restart, `make stop`) unloads its models before it closes
    # the port and answers NOT_FOUND "... has no available versions" meanwhile: the model
    # exists but is not loaded, which is unavailability, unlike a misspelt model name.
    return status == _NOT_FOUND and "no available versions" in message


def _is_connection_failure(exc: InferenceServerException) -> bool:
    text = (exc.message() or "").lower()
    return _status(exc) == _UNAVAILABLE and any(h in text for h in _CONNECTION_HINTS)


def _channel_args(max_backoff_s: float) -> list[tuple[str, Any]]:
    """tritonclient's default channel options plus a short reconnect backoff.

    gRPC otherwise waits up to 120 s between reconnection attempts, so after a server
    restart our retries would keep failing fast on a channel still in its backoff.
    """
    backoff_ms = max(100, int(max_backoff_s * 1000))
    return [
        ("grpc.max_send_message_length", _INT32_MAX),
        ("grpc.max_receive_message_length", _INT32_MAX),
        ("grpc.keepalive_time_ms", _INT32_MAX),
        ("grpc.keepalive_timeout_ms", 20000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", backoff_ms),
    ]


# --------------------------------------------------------------------------- model info


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as a model's config declares it (dims exclude the batch axis)."""

    name: str
    datatype: str  # Triton name: "FP32", "BYTES", ...
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(triton_to_np_dtype(self.datatype))


@dataclass(frozen=True)
class ModelInfo:
    """What the client needs from a model's config, fetched once per model."""

    name: str
    max_batch_size: int
    inputs: dict[str, TensorInfo]
    outputs: dict[str, TensorInfo]
    parameters: dict[str, str] = field(default_factory=dict)


def _datatype(enum_value: int) -> str:
    name = model_config_pb2.DataType.Name(enum_value).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


def _model_info(config: model_config_pb2.ModelConfig) -> ModelInfo:
    def tensors(items) -> dict[str, TensorInfo]:
        return {
            t.name: TensorInfo(t.name, _datatype(t.data_type), tuple(t.dims),
                               getattr(t, "optional", False))
            for t in items
        }

    return ModelInfo(
        name=config.name,
        max_batch_size=config.max_batch_size,
        inputs=tensors(config.input),
        outputs=tensors(config.output),
        parameters={k: v.string_value for k, v in config.parameters.items()},
    )


# --------------------------------------------------------------------------- tensors


def _is_text(value: object) -> bool:
    return isinstance(value, (bytes, bytearray, str, np.bytes_, np.str_))


def _to_bytes(value: object) -> bytes:
    return value.encode("utf-8") if isinstance(value, (str, np.str_)) else bytes(value)


def _as_array(value: object) -> np.ndarray:
    """A list/array of rows -> ndarray; text becomes an object array of UTF-8 bytes."""
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (list, tuple)):
        if value and all(_is_text(v) for v in value):
            arr = np.empty(len(value), dtype=object)
            arr[:] = [_to_bytes(v) for v in value]
            return arr
        arr = np.asarray(value)
    else:
        arr = np.asarray(value)
    if arr.dtype.kind in "US":
        out = np.empty(arr.shape, dtype=object)
        out.reshape(-1)[:] = [_to_bytes(v) for v in arr.reshape(-1)]
        return out
    if arr.dtype == object:
        flat = arr.reshape(-1)
        if any(isinstance(v, (str, np.str_)) for v in flat):
            out = np.empty(arr.shape, dtype=object)
            out.reshape(-1)[:] = [_to_bytes(v) if _is_text(v) else v for v in flat]
            return out
    return arr


def _fit(arr: np.ndarray, info: TensorInfo | None, batch: int | None, name: str) -> np.ndarray:
    """Reshape/cast ``arr`` to what the model declares, where that is unambiguous.

    ``batch`` is the row count (None: ``arr`` is one row without a batch axis).
    """
    if info is None:
        return arr
    lead = () if batch is None else (batch,)
    dims = info.dims
    if -1 not in dims and arr.shape[len(lead):] != dims:
        if arr.size == math.prod(lead) * math.prod(dims):
            arr = arr.reshape(lead + dims)  # e.g. N texts given flat for dims [1]
    want = info.np_dtype
    if arr.dtype != want and want != np.object_ and arr.dtype != np.object_:
        if not np.can_cast(arr.dtype, want, casting="same_kind"):
            raise InputError(
                f"input {name}: dtype {arr.dtype} cannot be sent as {info.datatype}; "
                f"pass a {want.name} array"
            )
        arr = arr.astype(want)
    return arr


def infer_inputs(arrays: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    """gRPC input tensors for ``arrays`` (name -> numpy array; object arrays go as BYTES)."""
    inputs = []
    for name, arr in arrays.items():
        datatype = "BYTES" if arr.dtype == object else np_to_triton_dtype(arr.dtype)
        if datatype is None:
            raise InputError(f"input {name}: dtype {arr.dtype} has no Triton equivalent")
        tensor = grpcclient.InferInput(name, list(arr.shape), datatype)
        try:
            tensor.set_data_from_numpy(np.ascontiguousarray(arr) if arr.dtype != object else arr)
        except (InferenceServerException, TypeError, ValueError) as exc:
            raise InputError(
                f"input {name}: cannot be serialised as {datatype} ({exc}); BYTES inputs take "
                "bytes or str rows, numeric inputs numbers"
            ) from exc
        inputs.append(tensor)
    return inputs


def _row_count(arrays: Mapping[str, np.ndarray], model: str) -> int:
    counts = {name: (len(a) if a.ndim else 1) for name, a in arrays.items()}
    if not counts:
        raise InputError(f"infer {model}: no inputs given (all were None or the dict is empty)")
    if len(set(counts.values())) != 1:
        listed = ", ".join(f"{k}={v}" for k, v in counts.items())
        raise InputError(
            f"infer {model}: inputs have different row counts ({listed}); the first axis "
            "is the batch and must be the same length for every input"
        )
    return next(iter(counts.values()))


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _empty_outputs(info: ModelInfo, outputs: Sequence[str]) -> dict[str, np.ndarray]:
    result = {}
    for name in outputs:
        out = info.outputs.get(name)
        dims = tuple(max(d, 0) for d in out.dims) if out else ()
        result[name] = np.empty((0, *dims), dtype=out.np_dtype if out else np.float32)
    return result


def _concatenate(parts: list[dict[str, np.ndarray]], outputs: Sequence[str], model: str) -> dict[str, np.ndarray]:
    result = {}
    for name in outputs:
        try:
            result[name] = np.concatenate([p[name] for p in parts], axis=0)
        except ValueError as exc:
            raise ServerError(
                f"infer {model}: output {name} has different shapes across requests ({exc}); "
                "use infer() per request for outputs with a variable non-batch axis"
            ) from exc
    return result


# --------------------------------------------------------------------------- shared base


class _ClientBase:
    """Configuration, error mapping and input preparation shared by both clients."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        timeout_s: float | None = 30.0,
        retries: int = 3,
        backoff_s: float = 0.1,
        max_backoff_s: float = 2.0,
        ssl: bool = False,
        root_certificates: str | None = None,
        private_key: str | None = None,
        certificate_chain: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if retries < 0:
            raise InputError(f"retries must be >= 0, got {retries}")
        self.url = url
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(retries, backoff_s, max_backoff_s)
        self.headers = dict(headers) if headers else None
        self._client_kwargs = dict(
            ssl=ssl,
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
            channel_args=_channel_args(max_backoff_s),
        )
        self._models: dict[str, ModelInfo] = {}
        self._lock = threading.Lock()
        self._connect()

    def _connect(self) -> None:
        raise NotImplementedError

    def _error(self, exc: InferenceServerException, what: str, attempts: int) -> XmsearchError:
        """Map a tritonclient error to the project's family (message names URL and step)."""
        status, message = _status(exc), exc.message() or str(exc)
        if status == _INVALID_ARGUMENT:
            # The server's message names the model/step that refused the input.
            return InputError(message)
        if _is_retryable(exc):
            tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
            if _is_connection_failure(exc):
                return ServerError(
                    f"server not reachable at {self.url} ({what}, {tries}): {message}; "
                    "check that tritonserver runs there (`make serve`) and the URL/port"
                )
            return ServerError(f"{what}: server at {self.url} unavailable ({tries}): {message}")
        if status == _DEADLINE:
            return ServerError(
                f"{what}: no answer from {self.url} within timeout_s={self.timeout_s}s; the "
                "server is overloaded or the request too big: raise timeout_s or lower batch_size"
            )
        return ServerError(f"{what} failed at {self.url}: {status or 'error'}: {message}")

    def _prepare(self, info: ModelInfo, inputs: Mapping[str, Any], batched: bool) -> dict[str, np.ndarray]:
        arrays = {}
        for name, value in inputs.items():
            if value is None:
                continue  # optional input left out
            arr = _as_array(value)
            rows = (len(arr) if arr.ndim else 1) if batched else None
            arrays[name] = _fit(arr, info.inputs.get(name), rows, name)
        return arrays

    def _batch_plan(self, info: ModelInfo, n: int, batch_size: int | None) -> int:
        if info.max_batch_size <= 0:
            raise InputError(
                f"model {info.name} has max_batch_size 0 (its first axis is not a batch); "
                "call infer() with whole tensors instead of infer_batched()"
            )
        size = batch_size or info.max_batch_size
        if not 0 < size <= info.max_batch_size:
            raise InputError(
                f"batch_size {size} for model {info.name} must be between 1 and its "
                f"max_batch_size {info.max_batch_size}"
            )
        return size

    def _not_ready_reason(self, index_entries: list, model: str) -> str:
        entries = [e for e in index_entries if e.name == model]
        if not entries:
            return "not in the server's model repository"
        for e in entries:
            if e.state != "READY":
                return f"{e.state or 'UNKNOWN'}: {e.reason or 'no reason given'}"
        # Loaded, yet the ready call says no: what a crashed python-backend stub looks like.
        return "loaded but reports not ready (a crashed python-backend stub does this); restart the server"


def _chunk_error(exc: XmsearchError, model: str, start: int, stop: int, n: int) -> XmsearchError:
    err = type(exc)(f"infer {model}: rows {start}-{stop - 1} of {n} failed: {exc}")
    err.__cause__ = exc
    return err


# --------------------------------------------------------------------------- sync client


class TritonClient(_ClientBase):
    """Blocking gRPC client (thread-safe: share one per process).

    ``timeout_s`` bounds each request; ``retries`` bounds the re-sends after UNAVAILABLE or
    a connection failure; the ``ssl``/certificate options and ``headers`` are passed to
    tritonclient unchanged.
    """

    def _connect(self) -> None:
        try:
            self._client = grpcclient.InferenceServerClient(self.url, **self._client_kwargs)
        except Exception as exc:  # tritonclient raises bare Exception on bad URLs/certs
            raise ServerError(f"cannot create a gRPC client for {self.url}: {exc}") from exc

    # -- lifecycle
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- plumbing
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except InferenceServerException as exc:
                if _is_retryable(exc) and attempt < self.retry.retries:
                    delay = self.retry.delay(attempt)
                    log.debug("%s: %s; retry %d in %.2fs", what, exc.message(), attempt + 1, delay)
                    time.sleep(delay)
                    attempt += 1
                    continue
                raise self._error(exc, what, attempt + 1) from exc

    # -- health and metadata
    def check_ready(self, models: Sequence[str]) -> None:
        """Raise :class:`ServerError` unless the server is live and each model is ready.

        Server readiness is not required (one failed model makes the whole server
        unready while the others keep serving); each model is asked on its own, since a
        dead python stub can leave the server's health endpoints reporting fine.
        """
        kw = dict(headers=self.headers, client_timeout=self.timeout_s)
        try:
            if not self._client.is_server_live(**kw):
                raise ServerError(f"server at {self.url} is not live")
            if not self._client.is_server_ready(**kw):
                log.info("server at %s is not ready (some model is not); checking %s", self.url, models)
            not_ready = [m for m in models if not self._client.is_model_ready(m, **kw)]
            if not_ready:
                index = self._client.get_model_repository_index(**kw).models
                m = not_ready[0]
                raise ServerError(
                    f"model {m} not ready at {self.url}: {self._not_ready_reason(list(index), m)}"
                )
        except InferenceServerException as exc:
            if _is_retryable(exc) or _status(exc) == _DEADLINE:
                raise ServerError(f"server not reachable at {self.url}: {exc.message()}") from exc
            raise self._error(exc, "check_ready", 1) from exc

    def model_info(self, model: str) -> ModelInfo:
        """Inputs, outputs, max batch size and parameters of ``model`` (cached)."""
        info = self._models.get(model)
        if info is None:
            response = self._call(
                f"get config of {model}",
                lambda: self._client.get_model_config(
                    model, headers=self.headers, client_timeout=self.timeout_s
                ),
            )
            info = _model_info(response.config)
            with self._lock:
                self._models[model] = info
        return info

    def model_parameters(self, model: str) -> dict[str, str]:
        """The ``parameters`` of ``model``'s config as strings (e.g. its fingerprint)."""
        return dict(self.model_info(model).parameters)

    def max_batch_size(self, model: str) -> int:
        return self.model_info(model).max_batch_size

    def inference_statistics(self, model: str) -> dict:
        """Server-side statistics of ``model`` (Triton's JSON form)."""
        return self._call(
            f"statistics of {model}",
            lambda: self._client.get_inference_statistics(
                model, headers=self.headers, as_json=True, client_timeout=self.timeout_s
            ),
        )

    # -- inference
    def _infer_arrays(self, model: str, arrays: Mapping[str, np.ndarray],
                      outputs: Sequence[str]) -> dict[str, np.ndarray]:
        tensors = infer_inputs(arrays)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs]
        result = self._call(
            f"infer {model}",
            lambda: self._client.infer(
                model, tensors, outputs=requested, headers=self.headers,
                client_timeout=self.timeout_s,
            ),
        )
        return {o: result.as_numpy(o) for o in outputs}

    def infer(self, model: str, inputs: Mapping[str, Any], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Send one request; return the requested outputs by name.

        Raises :class:`InputError` when the server rejects the input (INVALID_ARGUMENT;
        the message is the server's) and :class:`ServerError` otherwise.
        """
        info = self.model_info(model)
        arrays = self._prepare(info, inputs, batched=info.max_batch_size > 0)
        return self._infer_arrays(model, arrays, outputs)

    def infer_batched(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        batch_size: int | None = None,
        max_in_flight: int = 4,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run N rows through ``model`` in requests of at most ``batch_size`` rows.

        Up to ``max_in_flight`` requests run concurrently; outputs come back concatenated
        in input order.  The first failing request cancels the rest and raises, naming
        its rows.
        """
        info = self.model_info(model)
        arrays = self._prepare(info, inputs, batched=True)
        n = _row_count(arrays, model)
        size = self._batch_plan(info, n, batch_size)
        if n == 0:
            return _empty_outputs(info, outputs)
        chunks = _chunks(n, size)
        if len(chunks) == 1 and not progress:
            # One request (a single query): sent from this thread, no pool to start and join.
            try:
                return self._infer_arrays(model, arrays, outputs)
            except XmsearchError as exc:
                raise _chunk_error(exc, model, 0, n, n) from exc
        parts: list[dict[str, np.ndarray] | None] = [None] * len(chunks)
        bar = _progress_bar(progress, n, model)
        pool = ThreadPoolExecutor(max(1, min(max_in_flight, len(chunks))),
                                  thread_name_prefix=f"infer-{model}")
        try:
            futures = {
                pool.submit(self._infer_arrays, model,
                            {k: a[start:stop] for k, a in arrays.items()}, outputs): i
                for i, (start, stop) in enumerate(chunks)
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    i = futures[fut]
                    start, stop = chunks[i]
                    exc = fut.exception()
                    if exc is not None:
                        for other in pending:
                            other.cancel()
                        if isinstance(exc, XmsearchError):
                            raise _chunk_error(exc, model, start, stop, n) from exc
                        raise exc
                    parts[i] = fut.result()
                    if bar is not None:
                        bar.update(stop - start)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
        return _concatenate(parts, outputs, model)  # type: ignore[arg-type]


def _progress_bar(progress: bool, total: int, model: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=model, unit="row")


# --------------------------------------------------------------------------- coalescer


@dataclass
class _Pending:
    row: dict[str, np.ndarray]
    future: Future
    signature: tuple
    submitted: float


class Coalescer:
    """Merge concurrent single-row calls into batched requests (online serving).

    ``submit(row)`` queues one row (a dict of tensors *without* the batch axis) and returns
    a :class:`~concurrent.futures.Future` of its output row (an array for one ``output``,
    a dict for a list of outputs).  A background thread sends a request once
    ``max_batch_size`` rows are waiting or the first waiting row is ``max_wait_us`` old; up
    to ``max_in_flight`` requests run at once, and rows queue up meanwhile.  If a merged
    request is rejected as INVALID_ARGUMENT, its rows are re-sent one by one so that only
    the bad row's caller sees the error.
    """

    def __init__(
        self,
        client: TritonClient,
        model: str,
        output: str | Sequence[str],
        max_batch_size: int | None = None,
        max_wait_us: int = 2000,
        max_in_flight: int = 2,
    ) -> None:
        self._client = client
        self._model = model
        self._single = isinstance(output, str)
        self._outputs = [output] if isinstance(output, str) else list(output)
        self._info = client.model_info(model)
        limit = self._info.max_batch_size
        self.max_batch_size = max_batch_size or limit
        if limit > 0 and not 0 < self.max_batch_size <= limit:
            raise InputError(
                f"Coalescer max_batch_size {self.max_batch_size} for {model} must be between 1 "
                f"and the model's max_batch_size {limit}"
            )
        if limit <= 0:
            raise InputError(f"model {model} has no batch axis (max_batch_size 0): nothing to coalesce")
        self.max_wait_s = max_wait_us / 1e6
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._slots = threading.Semaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix=f"coalesce-{model}")
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"coalescer-{model}", daemon=True)
        self._thread.start()

    # -- callers
    def submit(self, inputs_row: Mapping[str, Any]) -> Future:
        """Queue one row; the future resolves to its output (or the row's own error)."""
        row = {}
        for name, value in inputs_row.items():
            if value is None:
                continue
            row[name] = _fit(_as_array(value), self._info.inputs.get(name), None, name)
        if not row:
            raise InputError(f"Coalescer({self._model}).submit: the row has no inputs")
        signature = tuple(sorted((k, a.dtype.str, a.shape) for k, a in row.items()))
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise ServerError(f"Coalescer for {self._model} at {self._client.url} is closed")
            self._queue.put(_Pending(row, future, signature, time.monotonic()))
        return future

    def __call__(self, inputs_row: Mapping[str, Any], timeout: float | None = None) -> Any:
        """Submit one row and wait for its output."""
        return self.submit(inputs_row).result(timeout)

    def close(self) -> None:
        """Answer every row already submitted, then stop the background threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> Coalescer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- background
    def _gather(self, first: _Pending) -> tuple[list[_Pending], _Pending | None, bool]:
        """Collect rows compatible with ``first``; return (batch, held-over row, stop)."""
        batch = [first]
        deadline = first.submitted + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                # Past the deadline (e.g. all slots were busy) take only what already waits.
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                return batch, None, True
            if item.signature != first.signature:
                return batch, item, False  # different inputs/shapes cannot share a request
            batch.append(item)
        return batch, None, False

    def _run(self) -> None:
        held: _Pending | None = None
        while True:
            # Take a slot before forming a batch: while requests are in flight rows keep
            # queueing, so a busy server gets bigger batches instead of more requests.
            self._slots.acquire()
            first = held if held is not None else self._queue.get()
            if first is None:
                self._slots.release()
                return
            batch, held, stop = self._gather(first)
            self._pool.submit(self._dispatch, batch)
            if stop:  # close() was called and every earlier row is now dispatched
                return

    def _pick(self, result: dict[str, np.ndarray], i: int) -> Any:
        if self._single:
            return result[self._outputs[0]][i].copy()
        return {name: result[name][i].copy() for name in self._outputs}

    def _send(self, batch: list[_Pending]) -> dict[str, np.ndarray]:
        stacked = {name: np.stack([p.row[name] for p in batch]) for name in batch[0].row}
        return self._client._infer_arrays(self._model, stacked, self._outputs)

    def _dispatch(self, batch: list[_Pending]) -> None:
        try:
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                return
            try:
                result = self._send(live)
            except InputError as exc:
                if len(live) == 1:
                    live[0].future.set_exception(exc)
                    return
                # One bad row fails the merged request: find it by sending rows alone.
                for p in live:
                    try:
                        p.future.set_result(self._pick(self._send([p]), 0))
                    except BaseException as row_exc:  # noqa: BLE001 - handed to the caller
                        p.future.set_exception(row_exc)
                return
            except BaseException as exc:  # noqa: BLE001 - every caller must hear of it
                for p in live:
                    p.future.set_exception(for_caller(exc))
                return
            for i, p in enumerate(live):
                p.future.set_result(self._pick(result, i))
        finally:
            self._slots.release()


# --------------------------------------------------------------------------- async client


class AsyncTritonClient(_ClientBase):
    """asyncio gRPC client with the same options and errors as :class:`TritonClient`.

    The gRPC channel binds to the running event loop on first use; create and use one
    client per loop and ``await close()`` (or ``async with``) when done.
    """

    def _connect(self) -> None:
        self._aio: grpcclient_aio.InferenceServerClient | None = None  # made on first use

    def _client(self) -> grpcclient_aio.InferenceServerClient:
        if self._aio is None:
            try:
                self._aio = grpcclient_aio.InferenceServerClient(self.url, **self._client_kwargs)
            except Exception as exc:  # tritonclient raises bare Exception on bad URLs/certs
                raise ServerError(f"cannot create a gRPC client for {self.url}: {exc}") from exc
        return self._aio

    async def close(self) -> None:
        if self._aio is not None:
            await self._aio.close()
            self._aio = None

    async def __aenter__(self) -> AsyncTritonClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def _call(self, what: str, make: Callable[[], Any]) -> Any:
        attempt = 0
        while True:
            try:
                return await make()
            except InferenceServerException as exc:
                if _is_retryable(exc) and attempt < self.retry.retries:
                    await asyncio.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise self._error(exc, what, attempt + 1) from exc

    async def check_ready(self, models: Sequence[str]) -> None:
        """Async :meth:`TritonClient.check_ready`."""
        client = self._client()
        kw = dict(headers=self.headers, client_timeout=self.timeout_s)
        try:
            if not await client.is_server_live(**kw):
                raise ServerError(f"server at {self.url} is not live")
            for m in models:
                if not await client.is_model_ready(m, **kw):
                    index = (await client.get_model_repository_index(**kw)).models
                    raise ServerError(
                        f"model {m} not ready at {self.url}: {self._not_ready_reason(list(index), m)}"
                    )
        except InferenceServerException as exc:
            if _is_retryable(exc) or _status(exc) == _DEADLINE:
                raise ServerError(f"server not reachable at {self.url}: {exc.message()}") from exc
            raise self._error(exc, "check_ready", 1) from exc

    async def model_info(self, model: str) -> ModelInfo:
        info = self._models.get(model)
        if info is None:
            client = self._client()
            response = await self._call(
                f"get config of {model}",
                lambda: client.get_model_config(model, headers=self.headers,
                                                client_timeout=self.timeout_s),
            )
            info = self._models[model] = _model_info(response.config)
        return info

    async def model_parameters(self, model: str) -> dict[str, str]:
        return dict((await self.model_info(model)).parameters)

    async def max_batch_size(self, model: str) -> int:
        return (await self.model_info(model)).max_batch_size

    async def _infer_arrays(self, model: str, arrays: Mapping[str, np.ndarray],
                            outputs: Sequence[str]) -> dict[str, np.ndarray]:
        client = self._client()
        tensors = infer_inputs(arrays)
        requested = [grpcclient.InferRequestedOutput(o) for o in outputs]
        result = await self._call(
            f"infer {model}",
            lambda: client.infer(model, tensors, outputs=requested, headers=self.headers,
                                 client_timeout=self.timeout_s),
        )
        return {o: result.as_numpy(o) for o in outputs}

    async def infer(self, model: str, inputs: Mapping[str, Any],
                    outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Async :meth:`TritonClient.infer`."""
        info = await self.model_info(model)
        arrays = self._prepare(info, inputs, batched=info.max_batch_size > 0)
        return await self._infer_arrays(model, arrays, outputs)

    async def infer_batched(
        self,
        model: str,
        inputs: Mapping[str, Any],
        outputs: Sequence[str],
        batch_size: int | None = None,
        max_in_flight: int = 4,
        progress: bool = False,
    ) -> dict[str, np.ndarray]:
        """Async :meth:`TritonClient.infer_batched` (a semaphore bounds requests in flight)."""
        info = await self.model_info(model)
        arrays = self._prepare(info, inputs, batched=True)
        n = _row_count(arrays, model)
        size = self._batch_plan(info, n, batch_size)
        if n == 0:
            return _empty_outputs(info, outputs)
        chunks = _chunks(n, size)
        gate = asyncio.Semaphore(max(1, max_in_flight))
        bar = _progress_bar(progress, n, model)

        async def run(start: int, stop: int) -> dict[str, np.ndarray]:
            async with gate:
                try:
                    part = await self._infer_arrays(
                        model, {k: a[start:stop] for k, a in arrays.items()}, outputs
                    )
                except XmsearchError as exc:
                    raise _chunk_error(exc, model, start, stop, n) from exc
            if bar is not None:
                bar.update(stop - start)
            return part

        tasks = [asyncio.ensure_future(run(start, stop)) for start, stop in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()  # no-op for finished ones; stops the rest after a failure
            if bar is not None:
                bar.close()
        return _concatenate(list(parts), outputs, model)


__all__ = [
    "AsyncTritonClient",
    "Coalescer",
    "ModelInfo",
    "RetryPolicy",
    "TensorInfo",
    "TritonClient",
]
