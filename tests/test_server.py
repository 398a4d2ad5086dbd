"""xmsearch.server: the bundled tritonserver, its backends copy, lifecycle and CLI helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from xmsearch.client.triton import TritonClient
from xmsearch.errors import ConfigError, ServerError
from xmsearch.server import (
    TritonServer,
    free_ports,
    locate_triton,
    log_excerpt,
    repository_models,
    server_environment,
    stop_from_pid_file,
    wait_until_ready,
    write_pid_file,
)

BROKEN_MESSAGE = "xmsearch-test: weights file /nonexistent/weights.onnx is missing"


def make_broken_model(repository: Path) -> None:
    """A python-backend model whose initialize() fails, as a missing weights file would."""
    model = repository / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(textwrap.dedent("""\
        name: "broken"
        backend: "python"
        max_batch_size: 4
        input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
        output [ { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ 4 ] } ]
        instance_group [ { count: 1 kind: KIND_CPU } ]
    """))
    (model / "1" / "model.py").write_text(textwrap.dedent(f"""\
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError({BROKEN_MESSAGE!r})

            def execute(self, requests):
                return []
    """))


# --------------------------------------------------------------------------- install


def test_locate_triton_prepares_private_backends_with_this_pythons_stub(tmp_path: Path) -> None:
    install = locate_triton(cache_dir=tmp_path)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheel_stub = install.binary.parent.parent / "python_backend_stubs" / version / "triton_python_backend_stub"
    stub = install.backends / "python" / "triton_python_backend_stub"

    assert install.backends.parent == tmp_path and f"py{version}" in install.backends.name
    assert (install.backends / "python" / "libtriton_python.so").is_file()
    assert stub.read_bytes() == wheel_stub.read_bytes() and os.access(stub, os.X_OK)
    assert not (wheel_stub.parent.parent.parent / "backends" / "python" / stub.name).exists()

    inode = stub.stat().st_ino
    assert locate_triton(cache_dir=tmp_path).backends == install.backends
    assert stub.stat().st_ino == inode  # up to date: reused, not copied again

    stub.write_bytes(b"truncated")  # a damaged copy is detected and rebuilt
    locate_triton(cache_dir=tmp_path)
    assert stub.read_bytes() == wheel_stub.read_bytes()


def test_backend_copies_of_two_installations_live_side_by_side(tmp_path: Path) -> None:
    """Two virtual environments (two checkouts) sharing a cache each keep their own copy: one
    rebuilding its copy never removes the other's from under a server that is starting."""
    from xmsearch.server import prepare_backends

    wheels = []
    for name in ("venv-a", "venv-b"):
        server_dir = tmp_path / name / "tritonserver"
        (server_dir / "backends" / "python").mkdir(parents=True)
        (server_dir / "backends" / "python" / "libtriton_python.so").write_bytes(name.encode())
        stubs = server_dir / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}"
        stubs.mkdir(parents=True)
        (stubs / "triton_python_backend_stub").write_bytes(b"stub " + name.encode())
        wheels.append(server_dir)
    cache = tmp_path / "cache"
    a, b = (prepare_backends(w, "0.7.0", cache) for w in wheels)
    assert a != b and a.parent == b.parent == cache
    assert (a / "python" / "libtriton_python.so").read_bytes() == b"venv-a"
    assert (b / "python" / "libtriton_python.so").read_bytes() == b"venv-b"
    inode = (a / "python" / "libtriton_python.so").stat().st_ino
    assert prepare_backends(wheels[0], "0.7.0", cache) == a  # still current: not rebuilt
    assert (a / "python" / "libtriton_python.so").stat().st_ino == inode


def test_server_environment_puts_venv_and_libpython_first(tmp_path: Path) -> None:
    install = locate_triton(cache_dir=tmp_path)
    env = server_environment(install, {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"})
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [
        sysconfig.get_config_var("LIBDIR"), str(install.libs), "/opt/lib"
    ]
    assert any(install.libs.glob("libtritonserver*.so*"))


def test_command_carries_shutdown_logging_and_shm_flags(tmp_path: Path, echo_repository: Path) -> None:
    install = locate_triton(cache_dir=tmp_path)
    server = TritonServer(echo_repository, 1, 2, 3, exit_timeout_s=7, shm_bytes=64 << 20,
                          extra_args=["--log-verbose=1"])
    cmd = server.command(install)
    assert "--exit-timeout-secs=7" in cmd and "--log-verbose=0" in cmd
    assert "--backend-config=python,shm-default-byte-size=67108864" in cmd
    assert any(a.startswith("--backend-config=python,shm-region-prefix-name=xmsearch_") for a in cmd)
    assert cmd[-1] == "--log-verbose=1"  # extra args come last, so they win
    assert server.url == "localhost:1" and server.http_url == "http://localhost:2"


def test_repository_models(tmp_path: Path, echo_repository: Path) -> None:
    assert repository_models(echo_repository) == ["echo_embed"]
    with pytest.raises(ConfigError, match="does not exist"):
        repository_models(tmp_path / "missing")


def test_log_excerpt_keeps_early_error_lines(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    lines = ["I1125 12:00:00.0 1 x.cc:1] info"] * 100
    lines[5] = 'E1125 12:00:00.0 1 model_lifecycle.cc:1] "failed to load \'broken\'"'
    log.write_text("\n".join(lines + ["last line"]))
    excerpt = log_excerpt(log, lines=10)
    assert "failed to load 'broken'" in excerpt and excerpt.endswith("last line")
    assert excerpt.count("info") == 9
    assert "no server log" in log_excerpt(None)


# --------------------------------------------------------------------------- pid files


def test_stop_from_pid_file_ignores_stale_and_foreign_pids(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    assert stop_from_pid_file(pid_file) is False  # no file

    gone = subprocess.Popen(["true"])
    gone.wait()
    write_pid_file(pid_file, gone.pid)
    assert stop_from_pid_file(pid_file) is False and not pid_file.exists()

    foreign = subprocess.Popen(["sleep", "30"])
    try:
        cmdline = Path(f"/proc/{foreign.pid}/cmdline")
        while not cmdline.read_bytes().startswith(b"sleep"):  # until exec has happened
            time.sleep(0.01)
        write_pid_file(pid_file, foreign.pid)
        with pytest.raises(ServerError, match="stale"):
            stop_from_pid_file(pid_file)
        assert foreign.poll() is None  # left alone
    finally:
        foreign.kill()
        foreign.wait()


# --------------------------------------------------------------------------- real server


@pytest.mark.triton
def test_model_load_failure_reports_the_log(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    make_broken_model(repository)
    server = TritonServer(repository, *free_ports(3), log_file=tmp_path / "server.log",
                          exit_timeout_s=2, die_with_parent=True)
    with pytest.raises(ServerError) as info:
        server.start(timeout=60)
    message = str(info.value)
    assert "exited with code" in message  # Triton exits on a failed load by default
    assert BROKEN_MESSAGE in message and str(tmp_path / "server.log") in message
    assert not server.is_running()


@pytest.mark.triton
@pytest.mark.slow
def test_failed_model_does_not_stop_the_others(tmp_path: Path, echo_repository: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(echo_repository / "echo_embed", repository / "echo_embed")
    make_broken_model(repository)
    server = TritonServer(repository, *free_ports(3), log_file=tmp_path / "server.log",
                          exit_timeout_s=2, die_with_parent=True, extra_args=["--exit-on-error=false"])
    server.start(wait=False)
    try:
        with pytest.raises(ServerError) as info:
            wait_until_ready(server.url, ["echo_embed", "broken"], timeout=60,
                             process=server.process, log_file=server.log_file)
        assert "model broken UNAVAILABLE" in str(info.value) and BROKEN_MESSAGE in str(info.value)
        assert server.is_running()

        with TritonClient(server.url, timeout_s=5) as client:
            client.check_ready(["echo_embed"])  # the healthy model serves on
            with pytest.raises(ServerError, match=f"model broken not ready at {server.url}: UNAVAILABLE"):
                client.check_ready(["echo_embed", "broken"])
    finally:
        assert server.stop() == 0


@pytest.mark.triton
def test_stop_kills_processes_left_behind_under_this_starts_shm_prefix(tmp_path: Path,
                                                                      echo_repository: Path) -> None:
    """A tritonserver that crashes (server#7368) can leave a python-backend stub running,
    re-parented to init.  Such a stub cannot be made on demand (killing the server by hand
    lets its stubs exit on their own), so a process carrying this start's shm prefix in its
    command line stands in for it; one with another server's prefix must survive."""
    server = TritonServer(echo_repository, *free_ports(3), log_file=tmp_path / "server.log",
                          exit_timeout_s=2, die_with_parent=True)
    server.start(wait=True, timeout=60)
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    ours = subprocess.Popen([*sleeper, f"{server._shm_prefix}stand-in-stub"])
    other = subprocess.Popen([*sleeper, "xmsearch_1_2_abcdef_another-server"])
    try:
        assert server.stop() == 0
        assert ours.wait(10) == -9  # SIGKILL: nothing is left for it to shut down cleanly
        assert other.poll() is None
    finally:
        for proc in (ours, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


SERVE_SCRIPT = """\
import sys
from pathlib import Path
from xmsearch.server import serve_forever

repo, grpc, http, metrics, pid_file, log_file = sys.argv[1:]
info = serve_forever(
    Path(repo), int(grpc), int(http), int(metrics), pid_file=Path(pid_file),
    log_file=Path(log_file), exit_timeout_s=2,
    on_ready=lambda i: print("READY", i.grpc_url, i.http_url, i.metrics_url, i.pid, ",".join(i.models), flush=True),
)
print("STOPPED", info.exit_code, flush=True)
"""


@pytest.mark.triton
@pytest.mark.slow
def test_serve_forever_runs_until_stopped_from_pid_file(tmp_path: Path, echo_repository: Path) -> None:
    pid_file, log_file = tmp_path / "run" / "triton.pid", tmp_path / "triton.log"
    ports = [str(p) for p in free_ports(3)]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(echo_repository), *ports, str(pid_file), str(log_file)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        ready: list[str] = []
        reader = threading.Thread(target=lambda: ready.append(proc.stdout.readline()))
        reader.start()
        reader.join(120)
        fields = ready[0].split() if ready else []
        assert fields[:1] == ["READY"], f"no READY line; log:\n{log_excerpt(log_file)}"
        grpc_url, http_url, metrics_url, triton_pid, models = fields[1:]
        assert grpc_url == f"localhost:{ports[0]}" and models == "echo_embed"
        assert pid_file.read_text().strip() == str(proc.pid)  # the wrapper, which forwards SIGTERM

        with TritonClient(grpc_url, timeout_s=5) as client:
            client.check_ready(["echo_embed"])
        assert urllib.request.urlopen(f"{http_url}/v2/health/ready", timeout=5).status == 200
        assert b"nv_inference_count" in urllib.request.urlopen(metrics_url, timeout=5).read()

        assert stop_from_pid_file(pid_file, timeout=30) is True
        rest = proc.communicate(timeout=30)[0]
        assert proc.returncode == 0 and "STOPPED 0" in rest
        assert not pid_file.exists()
        assert not Path(f"/proc/{triton_pid}").exists()
        with TritonClient(grpc_url, retries=0) as client, pytest.raises(ServerError, match="not reachable"):
            client.check_ready(["echo_embed"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.triton
def test_serve_forever_stops_promptly_when_signalled_during_start(tmp_path: Path, echo_repository: Path) -> None:
    pid_file, log_file = tmp_path / "triton.pid", tmp_path / "triton.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SCRIPT, str(echo_repository), *map(str, free_ports(3)),
         str(pid_file), str(log_file)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while "loading: echo_embed" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline and proc.poll() is None, log_excerpt(log_file)
            time.sleep(0.02)
        started = time.monotonic()
        assert stop_from_pid_file(pid_file, timeout=30) is True
        out = proc.communicate(timeout=30)[0]
        assert time.monotonic() - started < 10
        assert "READY" not in out and "STOPPED" in out and proc.returncode == 0
        assert not list(Path("/dev/shm").glob(f"xmsearch_{proc.pid}_*"))  # nothing leaked
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
