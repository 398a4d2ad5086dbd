"""Fixtures shared by the whole test suite.

Triton (real tritonserver from the nvidia-pytriton wheel, on free ports):

* ``start_triton(repository, **options)`` -- fixture returning a context-manager factory:
  ``with start_triton(repo) as server:`` starts a private server, waits until every
  model of ``repo`` is ready, and stops it on exit.  For tests that need their own server
  (a temp repository, a server they stop or restart).
* ``triton_server(repository, **options)`` -- session fixture returning a factory of
  *shared* servers: one server per repository (and options) for the whole session,
  stopped at the end.  Use it whenever the test only sends requests.
* ``echo_repository`` / ``echo_server`` -- the tiny test repository in
  ``tests/fixtures/echo_repository`` and its shared server.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from xmsearch.server import TritonServer, free_ports

FIXTURES = Path(__file__).parent / "fixtures"
ECHO_REPOSITORY = FIXTURES / "echo_repository"

# Tests stop servers often: Triton polls in-flight work once a second until this runs out.
TEST_EXIT_TIMEOUT_S = 2


# --------------------------------------------------------------------------- Triton


@pytest.fixture(scope="session")
def triton_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder for the tritonserver logs of this session (kept for post-mortems)."""
    return tmp_path_factory.mktemp("tritonserver-logs")


@pytest.fixture(scope="session")
def start_triton(triton_log_dir: Path) -> Callable[..., contextlib.AbstractContextManager[TritonServer]]:
    """Factory: ``with start_triton(repository, **options) as server`` (private server).

    Options go to :class:`xmsearch.server.TritonServer` (e.g. ``extra_args``); ``timeout``
    bounds the wait for readiness.  A start failure raises ServerError with the log tail.
    """

    @contextlib.contextmanager
    def start(repository: Path, *, timeout: float = 120.0, **options: Any) -> Iterator[TritonServer]:
        grpc_port, http_port, metrics_port = free_ports(3)
        options.setdefault("exit_timeout_s", TEST_EXIT_TIMEOUT_S)
        options.setdefault("log_file", triton_log_dir / f"{Path(repository).name}-{grpc_port}.log")
        options.setdefault("die_with_parent", True)  # a killed test run leaves no server behind
        server = TritonServer(repository, grpc_port, http_port, metrics_port, **options)
        server.start(wait=True, timeout=timeout)
        try:
            yield server
        finally:
            server.stop()

    return start


@pytest.fixture(scope="session")
def triton_server(start_triton: Callable[..., Any]) -> Iterator[Callable[..., TritonServer]]:
    """Factory: ``triton_server(repository, **options)`` -> a server shared by the session.

    Calls with the same repository and options get the same running server; all of them
    are stopped at the end of the session.
    """
    servers: dict[tuple[Path, str], TritonServer] = {}
    with contextlib.ExitStack() as stack:

        def get(repository: Path, **options: Any) -> TritonServer:
            key = (Path(repository).resolve(), repr(sorted(options.items())))
            if key not in servers:
                servers[key] = stack.enter_context(start_triton(key[0], **options))
            return servers[key]

        yield get


@pytest.fixture(scope="session")
def echo_repository() -> Path:
    """The test model repository: ``echo_embed`` (TEXT -> hash EMBEDDING [4])."""
    return ECHO_REPOSITORY


@pytest.fixture(scope="session")
def echo_server(triton_server: Callable[[Path], TritonServer], echo_repository: Path) -> TritonServer:
    """Shared tritonserver serving :func:`echo_repository`."""
    return triton_server(echo_repository)


# ------------------------------------------------------------------ xmsearch models


@pytest.fixture(scope="session")
def exported_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cpu-target repository exported once per session (real MiniLM + EfficientNet-Lite0).

    The fusion weights are the seeded untrained ones: plumbing, parity and error tests only
    need a fixed function; retrieval quality is tested on a trained checkpoint elsewhere.
    The text encoder and the fusion graphs stay fp32 (the cpu target's default is int8) so
    that the served vectors can be held to the PyTorch reference exactly;
    ``tests/test_quantize.py`` serves an int8 export against the same reference.
    """
    from xmsearch.export.pipeline import export_repository

    out = tmp_path_factory.mktemp("model_repository")
    export_repository(out, "cpu", untrained=True, text_precision="fp32", fusion_precision="fp32")
    return out


@pytest.fixture(scope="session")
def xm_server(triton_server: Callable[[Path], TritonServer], exported_repository: Path) -> TritonServer:
    """Shared tritonserver serving :func:`exported_repository`."""
    return triton_server(exported_repository)


@pytest.fixture(scope="session")
def reference_pipeline(exported_repository: Path):
    """The in-process reference of :func:`exported_repository` (same seeded fusion)."""
    from xmsearch.export.pipeline import load_fusion
    from xmsearch.pipeline import Encoders, ReferencePipeline

    enc = Encoders.load()
    return ReferencePipeline(enc, load_fusion(enc, None, untrained=True).fusion)


@pytest.fixture(scope="session")
def served_demo_index(xm_server: TritonServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(catalogue folder, index folder): the smallest demo catalogue, ingested through
    :func:`xm_server` into a Flat index once per session.  Read-only for its users."""
    from xmsearch.client.embed import Embedder
    from xmsearch.client.ingest import ingest_catalog
    from xmsearch.demo import MIN_ITEMS, generate_demo_catalog

    root = tmp_path_factory.mktemp("served_demo")
    generate_demo_catalog(root / "demo", n=MIN_ITEMS, seed=5, n_queries=0)
    embedder = Embedder(xm_server.url, timeout_s=120.0, retries=3)
    try:
        ingest_catalog(root / "demo" / "catalog.jsonl", root / "index", embedder)
    finally:
        embedder.close()
    return root / "demo", root / "index"
