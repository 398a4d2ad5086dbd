"""``xmsearch serve`` / ``stop`` / ``export`` / ``--help`` as a user runs them.

The serve tests use the tiny echo repository (tests/fixtures): what is under test is the
command's process handling (background start, pid file, stop, failure report), which
does not depend on the models, and the echo server starts in a couple of seconds.
The background test runs the installed ``xmsearch`` console script in its own process,
since the point is that the server outlives it; the others call ``xmsearch.cli.main``
in-process (a CLI start imports torch: seconds each on a small machine).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from xmsearch.cli import build_parser, main
from xmsearch.client.triton import TritonClient
from xmsearch.server import free_ports, stop_from_pid_file

pytestmark = pytest.mark.triton

XMSEARCH = Path(sys.executable).parent / "xmsearch"
BROKEN_MODEL = "broken_model"
BROKEN_REASON = "xmsearch test: this model is broken on purpose"


def gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return gone(pid)


def port_free(port: int) -> bool:
    """Whether a new server could listen on ``port`` (as tritonserver binds: 0.0.0.0, reuseaddr)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            s.listen(1)
        except OSError:
            return False
    return True


def port_args(grpc: int, http: int, metrics: int) -> list[str]:
    return ["--grpc-port", str(grpc), "--http-port", str(http), "--metrics-port", str(metrics)]


def echo_vector(text: str) -> np.ndarray:
    digest = hashlib.sha256(text.encode()).digest()
    return (np.frombuffer(digest[:16], dtype="<u4") / 2.0**32).astype(np.float32)


@pytest.fixture
def broken_repository(tmp_path: Path, echo_repository: Path) -> Path:
    """A repository whose one model raises in initialize()."""
    repo = tmp_path / "broken_repository"
    model = repo / BROKEN_MODEL
    (model / "1").mkdir(parents=True)
    config = (echo_repository / "echo_embed" / "config.pbtxt").read_text()
    (model / "config.pbtxt").write_text(config.replace('name: "echo_embed"', f'name: "{BROKEN_MODEL}"'))
    (model / "1" / "model.py").write_text(
        "class TritonPythonModel:\n"
        "    def initialize(self, args):\n"
        f"        raise RuntimeError({BROKEN_REASON!r})\n")
    return repo


# --------------------------------------------------------------------------- serve


@pytest.mark.slow
def test_serve_in_background_then_stop(tmp_path: Path, echo_repository: Path, capsys) -> None:
    grpc, http, metrics = free_ports(3)
    pid_file = tmp_path / "run" / "tritonserver.pid"
    log_file = tmp_path / "tritonserver.log"
    try:
        done = subprocess.run(
            [str(XMSEARCH), "serve", "--repository", str(echo_repository), *port_args(grpc, http, metrics),
             "--pid-file", str(pid_file), "--log-file", str(log_file), "--ready-timeout", "120"],
            capture_output=True, text=True, timeout=240)
        # The command has returned; the server it started must still be serving.
        assert done.returncode == 0, done.stderr
        assert f"gRPC localhost:{grpc}" in done.stdout and "echo_embed" in done.stdout
        pid = int(pid_file.read_text())
        assert not gone(pid)
        assert f"--grpc-port={grpc}" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        with TritonClient(f"localhost:{grpc}", timeout_s=10.0) as client:
            client.check_ready(["echo_embed"])
            out = client.infer("echo_embed", {"TEXT": ["red shoes"]}, ["EMBEDDING"])["EMBEDDING"]
        np.testing.assert_array_equal(out[0], echo_vector("red shoes"))
        assert "Started GRPCInferenceService" in log_file.read_text()

        assert main(["stop", "--pid-file", str(pid_file)]) == 0
        assert "stopped tritonserver" in capsys.readouterr().out
        assert wait_gone(pid, 5.0), f"tritonserver pid {pid} still running after stop"
        assert not pid_file.exists()
        assert all(port_free(p) for p in (grpc, http, metrics))

        assert main(["stop", "--pid-file", str(pid_file)]) == 0  # nothing left to stop
        assert "no server running" in capsys.readouterr().out
    finally:
        if pid_file.exists():
            stop_from_pid_file(pid_file, timeout=10)


class _ReadyWatch(io.StringIO):
    """stdout stand-in that notes when serve has printed its ready line."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = threading.Event()

    def write(self, text: str) -> int:
        n = super().write(text)
        if "tritonserver ready" in self.getvalue():
            self.ready.set()
        return n


def test_serve_in_foreground_stops_its_server_on_sigterm(
        tmp_path: Path, echo_repository: Path, capsys) -> None:
    """SIGTERM (a process manager stopping the service) stops tritonserver too.

    In-process: ``main`` blocks in this (main) thread, where serve_forever catches the
    signal; a helper thread sends SIGTERM to this process once serve says it is ready.
    """
    grpc, http, metrics = free_ports(3)
    outcome: dict[str, object] = {}
    sigterm_before = signal.getsignal(signal.SIGTERM)
    returned = threading.Event()  # main() is over: no signal may be sent any more
    stdout = _ReadyWatch()

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 120
        while not (returned.is_set() or stdout.ready.wait(0.2) or time.monotonic() > deadline):
            pass
        if returned.is_set():
            return  # serve failed on its own; its exit code tells the main thread
        try:
            with TritonClient(f"localhost:{grpc}", timeout_s=10.0, retries=0) as client:
                outcome["answer"] = client.infer("echo_embed", {"TEXT": ["boots"]}, ["EMBEDDING"])
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            outcome["infer error"] = exc
        if signal.getsignal(signal.SIGTERM) is sigterm_before:
            # SIGTERM now would kill the test run: record the failure, stop with Ctrl-C.
            outcome["error"] = "xmsearch serve has no SIGTERM handler: its server would be orphaned"
            os.kill(os.getpid(), signal.SIGINT)
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=stop_when_ready, daemon=True)
    helper.start()
    try:
        with contextlib.redirect_stdout(stdout):
            code = main(["serve", "--repository", str(echo_repository), *port_args(grpc, http, metrics),
                         "--log-file", str(tmp_path / "tritonserver.log"), "--ready-timeout", "120"])
    finally:
        returned.set()
    helper.join(10)
    out, err = stdout.getvalue(), capsys.readouterr().err
    assert "error" not in outcome, outcome["error"]
    assert code == 0, err
    assert "answer" in outcome, outcome.get("infer error", f"never ready: {out}")
    np.testing.assert_array_equal(outcome["answer"]["EMBEDDING"][0], echo_vector("boots"))
    assert f"metrics http://localhost:{metrics}/metrics;" in out
    server_pid = int(re.search(r"tritonserver ready \(pid (\d+)\)", out).group(1))
    assert wait_gone(server_pid, 5.0), "tritonserver outlived its foreground `xmsearch serve`"
    assert all(port_free(p) for p in (grpc, http, metrics))


@pytest.mark.parametrize("background", [True, False], ids=["pid-file", "foreground"])
def test_serve_broken_repository_fails_with_the_log_tail(
        tmp_path: Path, broken_repository: Path, background: bool, capsys) -> None:
    ports = free_ports(3)
    pid_file = tmp_path / "tritonserver.pid"
    log_file = tmp_path / "tritonserver.log"
    args = ["serve", "--repository", str(broken_repository), *port_args(*ports),
            "--log-file", str(log_file), "--ready-timeout", "60"]
    try:
        code = main(args + (["--pid-file", str(pid_file)] if background else []))
    finally:
        if pid_file.exists():
            stop_from_pid_file(pid_file, timeout=10)
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("error: ")
    assert BROKEN_MODEL in err and BROKEN_REASON in err  # the model and Triton's reason
    assert str(log_file) in err  # where the whole log is
    assert not pid_file.exists()
    assert all(port_free(p) for p in ports), "a failed start left a server listening"


# --------------------------------------------------------------------------- export


def test_export_needs_fusion_or_untrained(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--out", str(tmp_path / "repo")])
    assert info.value.code == 2
    assert "one of the arguments --fusion --untrained is required" in capsys.readouterr().err

    with pytest.raises(SystemExit) as info:
        main(["export", "--out", str(tmp_path / "repo"), "--fusion", "f.pt", "--untrained"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()  # refused before anything was written


def test_export_text_encoder_layout_is_checked_before_anything_is_written(tmp_path: Path, capsys) -> None:
    from xmsearch.cli import instances_by_threads

    assert instances_by_threads("2x1") == (2, 1) and instances_by_threads("1X4") == (1, 4)
    for bad, says in (("2", "expected INSTANCESxTHREADS"), ("0x2", "instances must be 1-16"),
                      ("2x0", "threads 1-64"), ("axb", "expected INSTANCESxTHREADS")):
        with pytest.raises(SystemExit) as info:
            main(["export", "--untrained", "--text-encoder-layout", bad, "--out", str(tmp_path / "repo")])
        assert info.value.code == 2
        assert says in capsys.readouterr().err, bad
    code = main(["export", "--untrained", "--target", "tensorrt", "--text-encoder-layout", "2x1",
                 "--out", str(tmp_path / "repo")])
    assert code == 2
    assert "--text-encoder-layout is for the cpu target, not tensorrt" in capsys.readouterr().err
    code = main(["export", "--untrained", "--target", "onnxruntime", "--image-encoder-layout", "2x1",
                 "--out", str(tmp_path / "repo")])
    assert code == 2
    assert "--image-encoder-layout is for the cpu target, not onnxruntime" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--untrained", "--image-encoder-layout", "0x1", "--out", str(tmp_path / "repo")])
    assert "instances must be 1-16" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("option,unknown,valid,target,refusal", [
    ("--ort-spinning", "sometimes", "run", "onnxruntime", "--ort-spinning is for the cpu target, not onnxruntime"),
    ("--fusion-precision", "fp16", "int8", "tensorrt",
     "fusion precision int8 is dynamic ONNX Runtime quantization"),
])
def test_export_option_is_checked_before_anything_is_written(option: str, unknown: str, valid: str, target: str,
                                                            refusal: str, tmp_path: Path, capsys) -> None:
    """An unknown value, then a known one the target cannot serve: both refused, nothing written."""
    with pytest.raises(SystemExit) as info:
        main(["export", "--untrained", option, unknown, "--out", str(tmp_path / "repo")])
    assert info.value.code == 2
    assert f"invalid choice: '{unknown}'" in capsys.readouterr().err
    code = main(["export", "--untrained", "--target", target, option, valid, "--out", str(tmp_path / "repo")])
    assert code == 2
    assert refusal in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_export_refuses_a_negative_queue_delay(tmp_path: Path, capsys) -> None:
    code = main(["export", "--untrained", "--queue-delay-us", "-5", "--out", str(tmp_path / "repo")])
    assert code == 2
    assert "--queue-delay-us must be 0 or more, got -5" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


# ----------------------------------------------------------------------------- help


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def options_of(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def test_top_level_help_lists_every_command(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xmsearch")
    for name in ("export", "serve", "stop", *subcommands()):
        assert name in out, name


@pytest.mark.parametrize("command", sorted(subcommands()))
def test_subcommand_help_mentions_its_options(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: xmsearch {command}")
    for option in options_of(subcommands()[command]):
        assert option in out, f"{command} --help does not mention {option}"
    if command == "serve":
        for option in ("--repository", "--grpc-port", "--http-port", "--metrics-port",
                       "--pid-file", "--log-file"):
            assert option in out
