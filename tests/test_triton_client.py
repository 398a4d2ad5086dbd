"""xmsearch.client.triton against a real tritonserver serving tests/fixtures/echo_repository.

``echo_embed`` maps each text to the first 16 bytes of its SHA-256 read as 4 uint32 / 2**32,
so every answer is recomputed here independently of the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import numpy as np
import pytest

from xmsearch.client.triton import AsyncTritonClient, Coalescer, TritonClient
from xmsearch.errors import InputError, ServerError
from xmsearch.server import free_port

MODEL = "echo_embed"
OUT = "EMBEDDING"

pytestmark = pytest.mark.triton


def reference(texts: list[str]) -> np.ndarray:
    rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype="<u4") / 2.0**32 for t in texts]
    return np.stack(rows).astype(np.float32)


def texts(n: int, prefix: str = "item") -> list[str]:
    return [f"{prefix} {i} caf\u00e9" for i in range(n)]


def stats(client: TritonClient) -> dict[str, int]:
    """Request/row/execution counters of the model, once the server stops updating them.

    Triton records a request's statistics just after sending its response, so a read
    right after a call may miss that call: read until two reads 30 ms apart agree.
    """
    current = _read_stats(client)
    for _ in range(50):
        time.sleep(0.03)
        again = _read_stats(client)
        if again == current:
            break
        current = again
    return current


def _read_stats(client: TritonClient) -> dict[str, int]:
    s = client.inference_statistics(MODEL)["model_stats"][0]
    inference = s["inference_stats"]
    return {
        "requests": int(inference.get("success", {}).get("count", 0)),
        "inferences": int(s.get("inference_count", 0)),
        "executions": int(s.get("execution_count", 0)),
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in before}


# The shared server restricts its statistics API to callers sending this header, which
# checks that custom headers reach the server (Triton prefixes the key it expects).
RESTRICTED = "--grpc-restricted-protocol=statistics:xmsearch-test-key=s3cret"
HEADERS = {"triton-grpc-protocol-xmsearch-test-key": "s3cret"}


@pytest.fixture(scope="module")
def guarded_server(triton_server, echo_repository):
    """The shared echo server, statistics API restricted to callers sending HEADERS."""
    return triton_server(echo_repository, extra_args=(RESTRICTED,))


@pytest.fixture(scope="module")
def client(guarded_server) -> TritonClient:
    with TritonClient(guarded_server.url, timeout_s=10.0, headers=HEADERS) as c:
        yield c


# --------------------------------------------------------------------------- basics


def test_check_ready_and_model_metadata(client: TritonClient, guarded_server) -> None:
    client.check_ready([MODEL])
    with pytest.raises(ServerError, match=rf"model no_such_model not ready at {guarded_server.url}: not in"):
        client.check_ready([MODEL, "no_such_model"])
    assert client.max_batch_size(MODEL) == 8
    assert client.model_parameters(MODEL) == {"xmsearch_fingerprint": "echo-sha256-v1"}


def test_infer_single_request_matches_reference(client: TritonClient) -> None:
    words = ["red shoes", "\u7ea2\u8272\u978b\u5b50"]  # non-ASCII goes through as UTF-8
    out = client.infer(MODEL, {"TEXT": words}, [OUT])
    np.testing.assert_array_equal(out[OUT], reference(words))


@pytest.mark.parametrize("n", [1, 8, 9])
def test_infer_batched_equals_one_by_one_in_order(client: TritonClient, n: int) -> None:
    words = texts(n, prefix=f"n{n}")
    one_by_one = np.concatenate([client.infer(MODEL, {"TEXT": [w]}, [OUT])[OUT] for w in words])

    before = stats(client)
    batched = client.infer_batched(MODEL, {"TEXT": words}, [OUT], max_in_flight=4)[OUT]
    used = delta(before, stats(client))

    np.testing.assert_array_equal(batched, one_by_one)
    np.testing.assert_array_equal(batched, reference(words))
    assert used["requests"] == -(-n // 8)  # split by the model's max_batch_size
    assert used["inferences"] == n


def test_infer_batched_input_forms_and_optional_inputs(client: TritonClient) -> None:
    words = texts(5, prefix="forms")
    as_objects = np.array([[w.encode()] for w in words], dtype=object)  # [N, 1] BYTES
    a = client.infer_batched(MODEL, {"TEXT": as_objects, "DELAY_S": None}, [OUT], batch_size=2)[OUT]
    # float64 list for an FP32 [1] input: reshaped to [N, 1] and cast.
    b = client.infer_batched(MODEL, {"TEXT": words, "DELAY_S": [0.0] * 5}, [OUT], batch_size=3)[OUT]
    np.testing.assert_array_equal(a, reference(words))
    np.testing.assert_array_equal(b, reference(words))


def test_infer_batched_empty_and_mismatched_inputs(client: TritonClient) -> None:
    empty = client.infer_batched(MODEL, {"TEXT": np.empty((0, 1), dtype=object)}, [OUT])[OUT]
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    with pytest.raises(InputError, match="different row counts"):
        client.infer_batched(MODEL, {"TEXT": ["a", "b"], "DELAY_S": [0.0]}, [OUT])
    with pytest.raises(InputError, match="max_batch_size 8"):
        client.infer_batched(MODEL, {"TEXT": ["a"]}, [OUT], batch_size=9)


def test_rejected_chunk_names_rows_and_is_not_retried(client: TritonClient) -> None:
    words = texts(12, prefix="bad")
    words[10] = ""
    before = stats(client)
    with pytest.raises(InputError) as info:
        client.infer_batched(MODEL, {"TEXT": words}, [OUT], batch_size=4, max_in_flight=1)
    message = str(info.value)
    assert "rows 8-11 of 12" in message
    assert "echo_embed step 'embed'" in message and "TEXT row 2" in message
    # INVALID_ARGUMENT is final: three chunks, three requests, no re-send.  (The python
    # backend counts an error response as a successful request in the statistics.)
    assert delta(before, stats(client))["requests"] == 3


def test_headers_reach_the_server(guarded_server) -> None:
    with TritonClient(guarded_server.url, retries=3, backoff_s=1.0) as anonymous:
        started = time.monotonic()
        with pytest.raises(ServerError, match="restricted"):
            anonymous.inference_statistics(MODEL)
        assert time.monotonic() - started < 0.5  # a refusal, not an outage: no retry
        anonymous.infer(MODEL, {"TEXT": ["open"]}, [OUT])  # inference is not restricted


def test_unreachable_url_fails_fast_naming_it() -> None:
    url = f"localhost:{free_port()}"
    with TritonClient(url, retries=2, backoff_s=0.05, timeout_s=5.0) as dead:
        started = time.monotonic()
        with pytest.raises(ServerError, match=f"server not reachable at {url}.*3 attempts"):
            dead.infer(MODEL, {"TEXT": ["x"]}, [OUT])
        with pytest.raises(ServerError, match=f"server not reachable at {url}"):
            dead.check_ready([MODEL])
        assert time.monotonic() - started < 3.0


def test_request_timeout_is_a_server_error(client: TritonClient, guarded_server) -> None:
    before = stats(client)
    with TritonClient(guarded_server.url, timeout_s=0.2) as impatient:
        started = time.monotonic()
        with pytest.raises(ServerError, match="within timeout_s=0.2"):
            impatient.infer(MODEL, {"TEXT": ["slow"], "DELAY_S": [0.6]}, [OUT])
        assert time.monotonic() - started < 0.5  # DEADLINE_EXCEEDED is not retried
    # The server still runs the abandoned request; let it finish so that the next test's
    # statistics do not count it.
    deadline = time.monotonic() + 5
    while stats(client)["inferences"] == before["inferences"] and time.monotonic() < deadline:
        time.sleep(0.05)


# --------------------------------------------------------------------------- coalescer


def _call_concurrently(coalescer: Coalescer, rows: list[str]) -> list[object]:
    barrier = threading.Barrier(len(rows))
    answers: list[object] = [None] * len(rows)

    def call(i: int) -> None:
        barrier.wait()
        try:
            answers[i] = coalescer({"TEXT": rows[i]}, timeout=30)
        except Exception as exc:  # noqa: BLE001 - recorded per caller
            answers[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(rows))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return answers


def test_coalescer_merges_concurrent_callers(client: TritonClient) -> None:
    words = texts(16, prefix="online")
    before = stats(client)
    with Coalescer(client, MODEL, OUT, max_batch_size=8, max_wait_us=50_000) as coalescer:
        answers = _call_concurrently(coalescer, words)
    used = delta(before, stats(client))

    expected = reference(words)
    for i, answer in enumerate(answers):
        assert isinstance(answer, np.ndarray), answer
        np.testing.assert_array_equal(answer, expected[i])
    assert used["inferences"] == 16
    assert used["requests"] < 16  # rows were merged client-side into fewer requests
    assert used["executions"] < used["inferences"]


def test_coalescer_bad_row_fails_only_its_caller(client: TritonClient) -> None:
    words = texts(8, prefix="mixed")
    words[3] = ""
    with Coalescer(client, MODEL, OUT, max_batch_size=8, max_wait_us=50_000) as coalescer:
        answers = _call_concurrently(coalescer, words)
    expected = reference([w or "unused" for w in words])
    for i, answer in enumerate(answers):
        if i == 3:
            assert isinstance(answer, InputError) and "TEXT row 0" in str(answer)
        else:
            assert isinstance(answer, np.ndarray), answer
            np.testing.assert_array_equal(answer, expected[i])


def test_coalescer_close_answers_pending_rows_then_refuses(client: TritonClient) -> None:
    coalescer = Coalescer(client, MODEL, [OUT], max_wait_us=200_000)
    futures = [coalescer.submit({"TEXT": w}) for w in texts(3, prefix="closing")]
    coalescer.close()
    for future, row in zip(futures, reference(texts(3, prefix="closing"))):
        np.testing.assert_array_equal(future.result(timeout=0)[OUT], row)
    with pytest.raises(ServerError, match="closed"):
        coalescer.submit({"TEXT": "late"})


# --------------------------------------------------------------------------- retries


@pytest.mark.slow
def test_infer_batched_survives_server_restart(start_triton, echo_repository) -> None:
    words = texts(24, prefix="restart")
    with start_triton(echo_repository) as server:
        client = TritonClient(server.url, retries=40, backoff_s=0.05, max_backoff_s=0.5, timeout_s=10.0)
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["out"] = client.infer_batched(
                    MODEL, {"TEXT": words, "DELAY_S": [0.1] * 24}, [OUT], batch_size=2, max_in_flight=2
                )[OUT]
            except Exception as exc:  # noqa: BLE001 - reported below
                result["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 10
        while stats(client)["requests"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.is_alive(), "finished before the restart: the test would prove nothing"
        server.stop()
        server.start()  # same ports
        worker.join(60)
        after = stats(client)  # the restarted server counts only what it answered
        client.close()

    assert "error" not in result, result.get("error")
    np.testing.assert_array_equal(result["out"], reference(words))
    assert 0 < after["inferences"] < 24  # some rows before the restart, the rest after


# --------------------------------------------------------------------------- asyncio


def test_async_client_matches_sync(client: TritonClient, guarded_server) -> None:
    words = texts(9, prefix="async")

    async def main() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncTritonClient(guarded_server.url, timeout_s=10.0) as aclient:
            await aclient.check_ready([MODEL])
            assert await aclient.max_batch_size(MODEL) == 8
            single = (await aclient.infer(MODEL, {"TEXT": words[:1]}, [OUT]))[OUT]
            batched = (await aclient.infer_batched(MODEL, {"TEXT": words}, [OUT], batch_size=4))[OUT]
            with pytest.raises(InputError, match=r"rows 4-7 of 9.*TEXT row 1"):
                bad = list(words)
                bad[5] = ""
                await aclient.infer_batched(MODEL, {"TEXT": bad}, [OUT], batch_size=4)
            return single, batched

    single, batched = asyncio.run(main())
    np.testing.assert_array_equal(batched, client.infer_batched(MODEL, {"TEXT": words}, [OUT])[OUT])
    np.testing.assert_array_equal(single, batched[:1])


def test_async_unreachable_url() -> None:
    url = f"localhost:{free_port()}"

    async def main() -> None:
        async with AsyncTritonClient(url, retries=1, backoff_s=0.05) as dead:
            await dead.infer(MODEL, {"TEXT": ["x"]}, [OUT])

    with pytest.raises(ServerError, match=f"server not reachable at {url}"):
        asyncio.run(main())
