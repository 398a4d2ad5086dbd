"""Run a real Triton Inference Server from the ``nvidia-pytriton`` wheel, without Docker.

The wheel ships the ``tritonserver`` binary (server 2.51), its python backend and one
``triton_python_backend_stub`` per Python version.  The binary is used directly with the
project's own model repository; PyTriton's decorators are not involved.  Three things make
the python backend work from a virtual environment (see ``shared/ENVIRONMENT.md``):

* a private copy of the ``backends`` folder holding the stub built for *this* interpreter,
  next to ``libtriton_python.so`` (the wheel's own folder is never modified);
* the interpreter's ``bin/`` first on ``PATH`` so that the stub imports the venv's packages;
* ``LD_LIBRARY_PATH`` starting with the interpreter's ``LIBDIR`` (otherwise the stub binds
  the system's older ``libpython`` and model loading fails on ``_ssl``), followed by the
  wheel's ``nvidia_pytriton.libs`` (the copied backend's relative RPATH no longer reaches it).

Library code here never prints: :func:`serve_forever` returns a :class:`ServerInfo` and
reports readiness through a callback so that the CLI decides what to show.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from xmsearch.errors import ConfigError, ServerError

log = logging.getLogger(__name__)

PYTRITON_DISTRIBUTION = "nvidia-pytriton"
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
# Python backend shared memory per model instance.  Triton's 1 MiB default, grown 1 MiB at
# a time, means dozens of remaps for one batch of 8 images (encoded bytes in, 8x3x224x224
# float32 pixels out = ~5 MiB); start at 16 MiB and grow in 8 MiB steps instead.
DEFAULT_SHM_BYTES = 16 * 1024 * 1024
DEFAULT_SHM_GROWTH_BYTES = 8 * 1024 * 1024
DEFAULT_EXIT_TIMEOUT_S = 30
LOG_TAIL_LINES = 40
# Error lines every CPU-only start prints: not worth showing in an error message.
_HARMLESS = ("CudaDriverHelper", "NVML", "DCGM", "pinned memory")


# --------------------------------------------------------------------------- install


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the bundled Triton server live."""

    binary: Path  # tritonserver executable (inside the wheel)
    backends: Path  # private backends folder with this interpreter's stub
    libs: Path  # nvidia_pytriton.libs: the binary's bundled shared libraries
    caches: Path  # response-cache plugins (inside the wheel)
    version: str  # nvidia-pytriton distribution version


def _pytriton_root() -> Path:
    # find_spec instead of import: importing pytriton pulls in its whole runtime.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(
            "tritonserver not found: the 'pytriton' package is not installed in "
            f"{sys.prefix}; run `make setup` (it installs {PYTRITON_DISTRIBUTION})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _cache_root() -> Path:
    explicit = os.environ.get("XMSEARCH_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "xmsearch"


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _same_file(a: Path, b: Path) -> bool:
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and int(sa.st_mtime) == int(sb.st_mtime)


def prepare_backends(server_dir: Path, version: str, cache_dir: Path | None = None) -> Path:
    """Return a private copy of the wheel's ``backends`` folder with this Python's stub.

    The copy lives in ``<cache>/triton-backends-<version>-py<X.Y>-<install>``, ``<install>`` a
    short hash of where the wheel is installed, and is rebuilt when it does not match the
    wheel (size and mtime of every file).  It is built in a temporary folder and renamed into
    place, so concurrent test sessions never see half a copy; and two virtual environments
    (two checkouts) keep a copy each, instead of replacing each other's, which a server of the
    other starting at that moment would find missing.
    """
    source = server_dir / "backends"
    stub = server_dir / "python_backend_stubs" / _python_version() / "triton_python_backend_stub"
    if not stub.is_file():
        available = sorted(p.name for p in (server_dir / "python_backend_stubs").glob("*"))
        raise ServerError(
            f"no python backend stub for Python {_python_version()} in {stub.parent.parent} "
            f"(available: {', '.join(available) or 'none'}); run xmsearch with one of those "
            "Python versions"
        )
    root = cache_dir or _cache_root()
    install = hashlib.sha256(str(Path(server_dir).resolve()).encode()).hexdigest()[:8]
    target = root / f"triton-backends-{version}-py{_python_version()}-{install}"
    wanted = {
        p.relative_to(source): p
        for p in source.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    wanted[Path("python/triton_python_backend_stub")] = stub
    if all(_same_file(src, target / rel) for rel, src in wanted.items()):
        return target

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        for rel, src in wanted.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, staging / rel)  # copy2 keeps mtime: that is the freshness check
        if target.exists():
            # Out of date: move it aside first (rename is atomic, rmtree is not).
            stale = Path(tempfile.mkdtemp(prefix=target.name + ".stale.", dir=root))
            with contextlib.suppress(OSError):
                target.rename(stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        try:
            staging.rename(target)
        except OSError:
            # Another process won the race; its copy is as good as ours.
            if not all(_same_file(src, target / rel) for rel, src in wanted.items()):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.debug("prepared Triton backends in %s", target)
    return target


def locate_triton(cache_dir: Path | None = None) -> TritonInstall:
    """Find the tritonserver bundled in ``nvidia-pytriton`` and prepare its backends."""
    root = _pytriton_root()
    server_dir = root / "tritonserver"
    binary = server_dir / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServerError(
            f"tritonserver binary missing at {binary}: the {PYTRITON_DISTRIBUTION} install is "
            "incomplete; reinstall it with `make setup`"
        )
    try:
        version = importlib.metadata.version(PYTRITON_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    libs = root.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        backends=prepare_backends(server_dir, version, cache_dir),
        libs=libs,
        caches=server_dir / "caches",
        version=version,
    )


def server_environment(install: TritonInstall, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver so that the python backend stub runs this venv."""
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env["PATH"]]) if env.get("PATH") else venv_bin
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    parts = [p for p in (libdir, str(install.libs), env.get("LD_LIBRARY_PATH", "")) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(parts)
    return env


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a TCP port that is free right now on every interface."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free TCP ports (sockets stay open until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))  # tritonserver binds 0.0.0.0: check that, not loopback
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def repository_models(repository: Path) -> list[str]:
    """Names of the models in a repository (folders holding a ``config.pbtxt``)."""
    repository = Path(repository)
    if not repository.is_dir():
        raise ConfigError(
            f"model repository {repository} does not exist; build it first "
            "(`xmsearch export --fusion CKPT --out DIR`, or `make export FUSION=CKPT`)"
        )
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))


def log_excerpt(log_file: Path | None, lines: int = LOG_TAIL_LINES) -> str:
    """The error lines and the last ``lines`` lines of a server log, for error messages."""
    if log_file is None:
        return "(no server log)"
    try:
        text = Path(log_file).read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"(server log {log_file} unreadable: {exc})"
    tail = text[-lines:]
    # Triton's error lines start with "E<MMDD>"; model load errors may scroll out of the tail.
    errors = [
        line for line in text[:-lines]
        if line[:1] == "E" and line[1:5].isdigit() and not any(h in line for h in _HARMLESS)
    ][-20:]
    parts = []
    if errors:
        parts += ["[error lines]", *errors, "[last lines]"]
    parts += tail
    return f"--- {log_file} ---\n" + "\n".join(parts)


def _model_states(client, models: Sequence[str]) -> dict[str, str]:
    """Model name -> 'READY' or the reason it is not (from the repository index)."""
    states: dict[str, str] = {}
    index = client.get_model_repository_index()
    by_name = {}
    for entry in index.models:
        by_name.setdefault(entry.name, []).append(entry)
    for name in models:
        entries = by_name.get(name)
        if not entries:
            states[name] = "not in the model repository"
            continue
        ready = [e for e in entries if e.state == "READY"]
        if ready:
            states[name] = "READY"
        else:
            e = entries[0]
            states[name] = f"{e.state or 'UNKNOWN'}: {e.reason or 'no reason given'}"
    return states


def wait_until_ready(
    grpc_url: str,
    models: Sequence[str] | None = None,
    timeout: float = 120.0,
    *,
    process: subprocess.Popen | None = None,
    log_file: Path | None = None,
    poll_s: float = 0.25,
    cancel: threading.Event | None = None,
) -> bool:
    """Block until the server is live and every model in ``models`` is ready.

    Server readiness alone is not enough: with strict readiness a failed model makes the
    whole server unready, and a dead python stub can leave it ready; so each model's own
    ready state is polled.  Raises :class:`ServerError` (with the log excerpt, so model load
    errors are visible) when ``timeout`` passes, when a model failed to load, or at once
    if ``process`` exits.  Returns True when ready, False if ``cancel`` was set first.
    """
    models = list(models or [])
    deadline = time.monotonic() + timeout
    last = "server not reachable yet"
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        while True:
            if cancel is not None and cancel.is_set():
                return False
            if process is not None and process.poll() is not None:
                raise ServerError(
                    f"tritonserver for {grpc_url} exited with code {process.returncode} while "
                    f"starting; see the log:\n{log_excerpt(log_file)}"
                )
            try:
                if client.is_server_live(client_timeout=2.0):
                    pending = [m for m in models if not client.is_model_ready(m, client_timeout=2.0)]
                    if not pending:
                        return True
                    states = _model_states(client, pending)
                    last = "; ".join(f"model {m} {s}" for m, s in states.items())
                    failed = [m for m, s in states.items() if s.startswith("UNAVAILABLE")]
                    # Nothing retries a failed load in the default control mode: once no
                    # model is still loading, a failure is final and waiting is pointless.
                    if failed and _load_finished(states):
                        raise ServerError(
                            f"models failed to load at {grpc_url}: {last}\n{log_excerpt(log_file)}"
                        )
                else:
                    last = "server not live"
            except InferenceServerException as exc:
                last = f"server not reachable: {exc.message()}"
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"tritonserver at {grpc_url} not ready after {timeout:.0f}s ({last}); "
                    f"see the log:\n{log_excerpt(log_file)}"
                )
            if cancel is not None:
                cancel.wait(poll_s)
            else:
                time.sleep(poll_s)
    finally:
        client.close()


def _load_finished(states: dict[str, str]) -> bool:
    return not any(s.startswith("LOADING") for s in states.values())


# Started as `python -I -S -c LAUNCHER PARENT_PID tritonserver ARGS...`: asks Linux to
# SIGTERM the process when the thread that started it exits, then becomes tritonserver
# (same pid; the request survives execve).  Not a preexec_fn: forking a process that runs
# gRPC threads and then executing Python in the child can abort in gRPC's fork handlers.
_DIE_WITH_PARENT_LAUNCHER = """\
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    os._exit(70)  # the parent is already gone
os.execv(sys.argv[2], sys.argv[2:])
"""


# --------------------------------------------------------------------------- server


@dataclass
class ServerInfo:
    """What a running (or finished) server was: for the CLI to print."""

    grpc_url: str
    http_url: str
    metrics_url: str
    pid: int
    log_file: Path
    repository: Path
    models: list[str] = field(default_factory=list)
    exit_code: int | None = None


class TritonServer:
    """One tritonserver process serving ``repository``.

    Use as a context manager (``with TritonServer(repo) as server: ...``) or call
    :meth:`start` / :meth:`stop`.  ``extra_args`` are appended to the command line and win
    over the defaults (Triton takes the last occurrence of a flag).

    With ``die_with_parent`` (Linux) the server gets SIGTERM when the *thread* that called
    :meth:`start` exits, so a test run or a ``serve`` wrapper killed hard leaves no server
    behind; start it from a thread that outlives it (normally the main thread).
    """

    def __init__(
        self,
        repository: Path,
        grpc_port: int = DEFAULT_GRPC_PORT,
        http_port: int = DEFAULT_HTTP_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        log_file: Path | None = None,
        extra_args: Sequence[str] = (),
        *,
        exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S,
        shm_bytes: int = DEFAULT_SHM_BYTES,
        shm_growth_bytes: int = DEFAULT_SHM_GROWTH_BYTES,
        address: str = "0.0.0.0",
        die_with_parent: bool = False,
        cache_dir: Path | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.extra_args = tuple(extra_args)
        self.exit_timeout_s = exit_timeout_s
        self.shm_bytes = shm_bytes
        self.shm_growth_bytes = shm_growth_bytes
        self.address = address
        self.die_with_parent = die_with_parent
        self.cache_dir = cache_dir
        self.log_file = Path(log_file) if log_file is not None else None
        self._process: subprocess.Popen | None = None
        self._log_handle = None
        self._shm_prefix = self._new_shm_prefix()

    def _new_shm_prefix(self) -> str:
        return f"xmsearch_{os.getpid()}_{self.grpc_port}_{os.urandom(3).hex()}_"

    # -- addresses
    @property
    def url(self) -> str:
        """gRPC address for ``tritonclient.grpc`` ("localhost:PORT")."""
        return f"localhost:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://localhost:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://localhost:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def process(self) -> subprocess.Popen | None:
        return self._process

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def models(self) -> list[str]:
        return repository_models(self.repository)

    def info(self) -> ServerInfo:
        return ServerInfo(
            grpc_url=self.url,
            http_url=self.http_url,
            metrics_url=self.metrics_url,
            pid=self.pid or 0,
            log_file=self.log_file or Path(os.devnull),
            repository=self.repository,
            models=self.models,
            exit_code=self._process.returncode if self._process is not None else None,
        )

    def command(self, install: TritonInstall) -> list[str]:
        """The tritonserver command line (without starting anything)."""
        # A unique shm prefix: two servers on one machine (parallel test sessions) would
        # otherwise fight over the same python-backend shared memory regions.
        shm_prefix = self._shm_prefix
        return [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={install.backends}",
            f"--cache-directory={install.caches}",
            f"--grpc-address={self.address}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.address}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.address}",
            f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
            # No GPU on most hosts; GPU metrics only add NVML/DCGM noise to the log.
            "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-default-byte-size={self.shm_bytes}",
            f"--backend-config=python,shm-growth-byte-size={self.shm_growth_bytes}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            *self.extra_args,
        ]

    # -- lifecycle
    def start(self, wait: bool = True, timeout: float = 120.0) -> TritonServer:
        """Start tritonserver; with ``wait`` block until every model is ready.

        On a start failure the process is stopped and :class:`ServerError` carries the
        log excerpt.
        """
        if self.is_running():
            raise ServerError(f"tritonserver for {self.repository} already running (pid {self.pid})")
        repository_models(self.repository)  # a missing repository fails here, clearly
        install = locate_triton(self.cache_dir)
        if self.log_file is None:
            fd, name = tempfile.mkstemp(prefix=f"tritonserver-{self.grpc_port}-", suffix=".log")
            os.close(fd)
            self.log_file = Path(name)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._shm_prefix = self._new_shm_prefix()
        cmd = self.command(install)
        log.info("starting tritonserver: %s", " ".join(cmd))
        if self.die_with_parent and sys.platform.startswith("linux"):
            cmd = [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT_LAUNCHER, str(os.getpid()), *cmd]
        try:
            self._process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_handle,
                stderr=subprocess.STDOUT,
                env=server_environment(install),
            )
        except OSError as exc:
            self._close_log()
            raise ServerError(f"could not run {install.binary}: {exc}") from exc
        if wait:
            try:
                self.wait_until_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def _enabled_ports(self) -> list[int]:
        disabled = {a.split("=", 1)[0] for a in self.extra_args if a.endswith(("=false", "=0"))}
        ports = []
        if "--allow-http" not in disabled:
            ports.append(self.http_port)
        if "--allow-metrics" not in disabled:
            ports.append(self.metrics_port)
        return ports

    def _wait_for_other_endpoints(self, timeout: float) -> None:
        # Triton opens gRPC first and HTTP/metrics a few ms later: "ready" must cover all
        # three, or a probe sent right after start() can be refused.
        deadline = time.monotonic() + max(timeout, 1.0)
        host = "127.0.0.1" if self.address in ("0.0.0.0", "localhost") else self.address
        for port in self._enabled_ports():
            while True:
                with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
                    break
                if self._process is not None and self._process.poll() is not None:
                    raise ServerError(
                        f"tritonserver exited with code {self._process.returncode} while "
                        f"opening port {port}:\n{self.log_excerpt()}"
                    )
                if time.monotonic() >= deadline:
                    raise ServerError(
                        f"tritonserver is ready on gRPC but port {port} never opened:\n"
                        f"{self.log_excerpt()}"
                    )
                time.sleep(0.05)

    def wait_until_ready(self, timeout: float = 120.0, cancel: threading.Event | None = None) -> bool:
        """Block until every model of the repository and every endpoint is ready.

        See :func:`wait_until_ready`; returns False if ``cancel`` was set first.
        """
        started = time.monotonic()
        if not wait_until_ready(self.url, self.models, timeout, process=self._process,
                                log_file=self.log_file, cancel=cancel):
            return False
        self._wait_for_other_endpoints(timeout - (time.monotonic() - started))
        return True

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); return its exit code.

        ``timeout`` defaults to the exit timeout plus a grace period, since Triton lets
        in-flight requests finish before it exits.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            limit = timeout if timeout is not None else self.exit_timeout_s + 10
            try:
                process.wait(limit)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver pid %d ignored SIGTERM for %.0fs; killing", process.pid, limit)
                process.kill()
                process.wait()
        self._close_log()
        self._kill_orphaned_stubs()
        self._remove_shm_regions()
        return process.returncode

    def _kill_orphaned_stubs(self) -> None:
        # A server that died without shutting its models down (SIGKILL, or the SIGSEGV of
        # triton-inference-server/server#7368) leaves its python-backend stubs running,
        # re-parented to init, each still holding a CPU thread and its shared memory.  Their
        # command lines carry this start's unique shm prefix, so they are ours to stop.
        if not sys.platform.startswith("linux"):
            return
        token = self._shm_prefix.encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if token in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
                    log.warning("killed python-backend stub pid %s left behind by tritonserver", entry.name)
            except (OSError, ValueError):
                continue  # gone meanwhile, or not ours to signal

    def _remove_shm_regions(self) -> None:
        # A server stopped while its python models were still loading can leave their
        # shared-memory regions behind; the prefix is unique to this start, so what is left
        # under it belongs to nobody else.
        for region in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()
                log.debug("removed leftover shared memory %s", region)

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def log_excerpt(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_excerpt(self.log_file, lines)

    def __enter__(self) -> TritonServer:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- CLI helpers


def write_pid_file(path: Path, pid: int | None = None) -> Path:
    """Write ``pid`` (default: this process) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{pid if pid is not None else os.getpid()}\n")
    tmp.replace(path)
    return path


def _read_pid(path: Path) -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError) as exc:
        raise ServerError(f"pid file {path} is unreadable ({exc}); remove it") from exc


def _cmdline(pid: int) -> str | None:
    """The command line of ``pid``; None where /proc cannot tell (not Linux, no access)."""
    path = Path(f"/proc/{pid}/cmdline")
    for _ in range(20):
        try:
            raw = path.read_bytes()
        except OSError:
            return None
        if raw:
            return raw.replace(b"\0", b" ").decode(errors="replace")
        time.sleep(0.05)  # empty while the process is between fork and exec
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited but not been reaped: treat as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def stop_from_pid_file(path: Path, timeout: float = DEFAULT_EXIT_TIMEOUT_S + 10) -> bool:
    """Stop the server whose pid is in ``path``; return False if it was not running.

    Sends SIGTERM (the serve wrapper forwards it; tritonserver drains in-flight requests),
    waits up to ``timeout`` seconds, then SIGKILL.  The pid file is removed.  A pid that now
    belongs to an unrelated process (stale file, pid reused) is left alone.
    """
    path = Path(path)
    if not path.exists():
        return False
    pid = _read_pid(path)
    if not _alive(pid):
        path.unlink(missing_ok=True)
        return False
    cmdline = _cmdline(pid)
    if cmdline is not None and "tritonserver" not in cmdline and "xmsearch" not in cmdline:
        raise ServerError(
            f"pid {pid} in {path} is not a tritonserver/xmsearch process ({cmdline[:80]!r}); "
            f"the pid file is stale: remove {path}"
        )
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(pid):
        log.warning("pid %d did not stop within %.0fs; killing", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGINT/SIGTERM while inside the block (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals can only be caught on the main thread
        return

    def handler(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def serve_forever(
    repository: Path,
    grpc_port: int = DEFAULT_GRPC_PORT,
    http_port: int = DEFAULT_HTTP_PORT,
    metrics_port: int = DEFAULT_METRICS_PORT,
    *,
    log_file: Path | None = None,
    pid_file: Path | None = None,
    extra_args: Sequence[str] = (),
    ready_timeout: float = 300.0,
    exit_timeout_s: int = DEFAULT_EXIT_TIMEOUT_S,
    on_ready: Callable[[ServerInfo], None] | None = None,
    stop_event: threading.Event | None = None,
) -> ServerInfo:
    """Serve ``repository`` until SIGINT/SIGTERM (or ``stop_event``), then stop cleanly.

    Prints nothing: ``on_ready`` receives the :class:`ServerInfo` once every model is
    ready, and the same info (with the exit code) is returned after the stop.  A signal
    during start-up stops the server without waiting for the models.  With ``pid_file``,
    this process's pid is written there (for ``make stop``) and removed on exit.  Raises
    :class:`ServerError` if the server fails to start or dies on its own.
    """
    stop = stop_event if stop_event is not None else threading.Event()
    server = TritonServer(
        repository,
        grpc_port,
        http_port,
        metrics_port,
        log_file=log_file,
        extra_args=extra_args,
        exit_timeout_s=exit_timeout_s,
        die_with_parent=True,
    )
    with _stop_on_signals(stop):
        if pid_file is not None:
            write_pid_file(pid_file)
        try:
            server.start(wait=False)
            if server.wait_until_ready(ready_timeout, cancel=stop) and on_ready is not None:
                on_ready(server.info())
            while not stop.is_set():
                if server.process is not None and server.process.poll() is not None:
                    raise ServerError(
                        f"tritonserver (pid {server.pid}) exited on its own with code "
                        f"{server.process.returncode}:\n{server.log_excerpt()}"
                    )
                stop.wait(0.5)
            server.stop()
            return server.info()
        finally:
            if server.is_running():
                server.stop()
            if pid_file is not None:
                with contextlib.suppress(ServerError, OSError):
                    if _read_pid(pid_file) == os.getpid():
                        Path(pid_file).unlink()
