"""Drive perf_analyzer over concurrency levels and parse what it writes.

One perf_analyzer run per concurrency level (``--concurrency-range C:C``): its
``--concurrency-range`` only steps linearly, and the sweep wants 1, 2, 4, ... 64.  Each
run measures in time windows (``--measurement-interval``) until the last three windows
agree within ``--stability-percentage`` or ``--max-trials`` is reached, and writes
``-f CSV --verbose-csv``.  A level that never stabilises is retried once with longer
windows, then skipped (recorded in :attr:`SweepResult.skipped`).

What perf_analyzer 2.60 writes (against tritonserver 2.51; real samples in
tests/fixtures/perf_analyzer/), all times in microseconds:

* CSV: a header and one row per concurrency, *sorted by throughput*: ``Concurrency,
  Inferences/Second, Client Send, Network+Server Send/Recv, Server Queue, Server Compute
  Input, Server Compute Infer, Server Compute Output, Client Recv, p50/p90/p95/p99
  latency``; ``--verbose-csv`` adds ``Avg latency, request/response, response wait``
  (gRPC marshalling and wait) and, with ``--collect-metrics``, GPU metric columns.
* For an ensemble the CSV's compute columns are the *sums over its composing models*,
  but ``Server Queue`` is only the ensemble scheduler's own queue (near zero): the
  members' queueing is visible only in the console's ``Composing models:`` blocks,
  which :func:`parse_console` reads (per model: counts, overhead, queue, compute
  input/infer/output).  :attr:`SweepRow.server_queue_total_us` adds them back up.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import shlex
import shutil
import subprocess
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

from xmsearch.errors import ConfigError, InputError, ServerError

log = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
TOOLS_WRAPPER = BENCH_DIR / ".tools" / "perf_analyzer"
SETUP_SCRIPT = BENCH_DIR / "setup_perf_analyzer.sh"

DEFAULT_CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
QUICK_CONCURRENCY = (1, 4, 16)
UNSTABLE_MARKER = "Failed to obtain stable measurement"


@dataclass(frozen=True)
class SweepSettings:
    """How hard and how long to measure each concurrency level."""

    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    # 3 s windows, 15 %: a 2-core CPU server is noisy; 4 ensembles x 7 levels stay ~5-10 min.
    measurement_interval_ms: int = 3000
    stability_percentage: float = 15.0
    max_trials: int = 8
    # Stabilise on a latency percentile instead of the average (perf_analyzer --percentile).
    percentile: int | None = None
    # GPU metrics from the server's /metrics; CPU-only servers report none, so off by default.
    collect_metrics: bool = False
    verbose_csv: bool = True

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ConfigError(f"sweep: concurrency levels must be >= 1, got {self.concurrency}")
        if self.measurement_interval_ms < 100:
            raise ConfigError(f"sweep: measurement interval {self.measurement_interval_ms} ms is too short (>= 100)")


QUICK_SETTINGS = SweepSettings(concurrency=QUICK_CONCURRENCY, measurement_interval_ms=1500,
                               stability_percentage=30.0, max_trials=4)


@dataclass
class ComposingStats:
    """Server-side averages of one composing model of an ensemble at one concurrency (us)."""

    model: str
    inference_count: int
    execution_count: int
    latency_us: float
    overhead_us: float
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float

    @property
    def avg_batch(self) -> float:
        """Requests per model execution: how much the dynamic batcher merged."""
        return self.inference_count / self.execution_count if self.execution_count else 0.0


@dataclass
class SweepRow:
    """One measured concurrency level; latencies in microseconds."""

    concurrency: int
    throughput: float  # inferences per second
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float | None
    client_send_us: float
    client_recv_us: float
    network_server_us: float
    server_queue_us: float
    server_compute_input_us: float
    server_compute_infer_us: float
    server_compute_output_us: float
    composing: list[ComposingStats] = field(default_factory=list)

    @property
    def server_queue_total_us(self) -> float:
        """Queue time including the composing models' queues (see the module notes)."""
        return self.server_queue_us + sum(c.queue_us for c in self.composing)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SweepRow":
        data = dict(data)
        data["composing"] = [ComposingStats(**c) for c in data.get("composing", [])]
        return cls(**data)


@dataclass
class SweepResult:
    """A model's sweep: its rows (sorted by concurrency), the commands run, the raw files."""

    model: str
    rows: list[SweepRow]
    commands: list[list[str]]
    csv_path: Path
    log_path: Path
    skipped: list[int] = field(default_factory=list)  # levels with no stable measurement

    def command_text(self) -> str:
        """The commands as one copy-pasteable shell snippet."""
        return "\n".join(shlex.join(c) for c in self.commands)

    def to_json(self) -> str:
        return json.dumps({"model": self.model, "rows": [r.to_dict() for r in self.rows],
                           "commands": self.commands, "csv_path": str(self.csv_path),
                           "log_path": str(self.log_path), "skipped": self.skipped}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "SweepResult":
        data = json.loads(text)
        return cls(model=data["model"], rows=[SweepRow.from_dict(r) for r in data["rows"]],
                   commands=data["commands"], csv_path=Path(data["csv_path"]),
                   log_path=Path(data["log_path"]), skipped=data.get("skipped", []))


# --- locating the binary -------------------------------------------------------------

def find_perf_analyzer(setup: bool = True) -> Path:
    """Return a runnable perf_analyzer: the benchmarks/.tools wrapper, else one on PATH.

    With ``setup=True`` and neither present, runs ``benchmarks/setup_perf_analyzer.sh``
    (downloads the wheel, and on glibc < 2.38 a private Debian trixie runtime).
    """
    if TOOLS_WRAPPER.is_file():
        return TOOLS_WRAPPER
    on_path = shutil.which("perf_analyzer")
    if on_path:
        return Path(on_path)
    if not setup:
        raise ConfigError("perf_analyzer: not found in benchmarks/.tools or on PATH; "
                          f"run {SETUP_SCRIPT} first")
    log.info("perf_analyzer: running %s", SETUP_SCRIPT)
    proc = subprocess.run(["bash", str(SETUP_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0 or not TOOLS_WRAPPER.is_file():
        raise ConfigError(f"perf_analyzer: {SETUP_SCRIPT} failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-800:]}")
    return TOOLS_WRAPPER


def perf_analyzer_version(perf_analyzer: Path | str) -> str:
    """The wheel's version if the binary came from benchmarks/.tools, plus its own banner.

    The binary itself prints "Perf Analyzer Version 0.0.0 (commit ...)" for PyPI builds,
    so the wheel folder name is the useful part.
    """
    try:
        proc = subprocess.run([str(perf_analyzer), "--version"], capture_output=True, text=True, timeout=30)
        banner = (proc.stdout + proc.stderr).strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        banner = []
    wheels = sorted(p.name.removeprefix("wheel-") for p in (BENCH_DIR / ".tools").glob("wheel-*"))
    parts = ([f"perf-analyzer {wheels[-1]} (PyPI wheel)"] if wheels else []) + banner[:1]
    return "; ".join(parts) or "unknown"


# --- running ---------------------------------------------------------------------------

def build_command(perf_analyzer: Path | str, model: str, url: str, input_data_path: Path,
                  csv_path: Path, concurrency: int, settings: SweepSettings,
                  metrics_url: str | None = None) -> list[str]:
    """The perf_analyzer command line for one concurrency level over gRPC."""
    cmd = [str(perf_analyzer), "-m", model, "-i", "grpc", "-u", url,
           "--input-data", str(input_data_path),
           "--concurrency-range", f"{concurrency}:{concurrency}",
           "--measurement-mode", "time_windows",
           "--measurement-interval", str(settings.measurement_interval_ms),
           "--stability-percentage", f"{settings.stability_percentage:g}",
           "--max-trials", str(settings.max_trials),
           "-f", str(csv_path)]
    if settings.verbose_csv or settings.collect_metrics:  # metrics need the verbose CSV
        cmd += ["--verbose-csv"]
    if settings.percentile is not None:
        cmd += ["--percentile", str(settings.percentile)]
    if settings.collect_metrics:
        cmd += ["--collect-metrics"]
        if metrics_url:
            cmd += ["--metrics-url", metrics_url]
    return cmd


def _run_timeout_s(settings: SweepSettings) -> float:
    # Each trial is one window; perf_analyzer adds warm-up and a few extra windows.
    return 60.0 + (settings.max_trials + 3) * settings.measurement_interval_ms / 1000.0 * 2


def run_sweep(model: str, url: str, input_data_path: Path, out_dir: Path,
              settings: SweepSettings = SweepSettings(), perf_analyzer: Path | None = None,
              metrics_url: str | None = None) -> SweepResult:
    """Measure ``model`` at each concurrency level; write ``<model>.csv/.log/.json`` in ``out_dir``.

    The CSV written is the concatenation of the per-level CSVs (one header).  Raises
    :class:`ServerError` when perf_analyzer fails (its last output lines in the message).
    """
    input_data_path = Path(input_data_path)
    if not input_data_path.is_file():
        raise InputError(f"sweep {model}: input data {input_data_path} does not exist; "
                         "write it with benchmarks.input_data.write_input_data")
    exe = perf_analyzer or find_perf_analyzer()
    out_dir = Path(out_dir)
    (out_dir / "raw").mkdir(parents=True, exist_ok=True)
    commands: list[list[str]] = []
    csv_texts: list[str] = []
    logs: list[str] = []
    skipped: list[int] = []
    for level in settings.concurrency:
        level_csv = out_dir / "raw" / f"{model}_c{level}.csv"
        level_settings = settings
        for attempt in range(2):
            cmd = build_command(exe, model, url, input_data_path, level_csv, level, level_settings, metrics_url)
            level_csv.unlink(missing_ok=True)
            log.info("sweep %s: concurrency %d (attempt %d)", model, level, attempt + 1)
            proc = _run_once(cmd, model, level, url, level_settings)
            commands.append(cmd)
            logs.append(f"$ {shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
            output = proc.stdout + proc.stderr
            if proc.returncode == 0 and level_csv.is_file():
                csv_texts.append(level_csv.read_text())
                break
            if UNSTABLE_MARKER not in output:
                tail = "\n".join(output.strip().splitlines()[-12:])
                raise ServerError(f"sweep {model}: perf_analyzer failed at concurrency {level} "
                                  f"(exit {proc.returncode}) against {url}:\n{tail}")
            # A noisy shared machine: one retry with longer windows before giving up on the level.
            level_settings = replace(settings, measurement_interval_ms=settings.measurement_interval_ms * 2,
                                     max_trials=settings.max_trials + 4)
        else:
            log.warning("sweep %s: no stable measurement at concurrency %d; level skipped", model, level)
            skipped.append(level)
    if not csv_texts:
        raise ServerError(f"sweep {model}: no concurrency level gave a stable measurement against {url}; "
                          "use longer windows (--measurement-interval) or a looser --stability-percentage, "
                          "or measure on a quieter machine")
    csv_path = out_dir / f"{model}.csv"
    log_path = out_dir / f"{model}.log"
    csv_path.write_text(merge_csv(csv_texts))
    log_path.write_text("\n".join(logs))
    rows = parse_csv(csv_path.read_text())
    attach_composing(rows, parse_console(log_path.read_text()))
    result = SweepResult(model=model, rows=rows, commands=commands, csv_path=csv_path, log_path=log_path,
                         skipped=skipped)
    (out_dir / f"{model}.json").write_text(result.to_json())
    return result


def _run_once(cmd: list[str], model: str, level: int, url: str,
              settings: SweepSettings) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=_run_timeout_s(settings))
    except subprocess.TimeoutExpired as e:
        raise ServerError(f"sweep {model}: perf_analyzer at concurrency {level} did not finish in "
                          f"{e.timeout:.0f} s; is the server at {url} serving {model}?") from e


# --- parsing ---------------------------------------------------------------------------

def merge_csv(texts: Sequence[str]) -> str:
    """Concatenate per-level CSV texts under the first one's header."""
    header: str | None = None
    body: list[str] = []
    for text in texts:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            continue
        if header is None:
            header = lines[0]
        elif lines[0] != header:
            raise InputError("perf_analyzer CSV: per-level files have different headers; "
                             "were they written by different perf_analyzer versions?")
        body.extend(lines[1:])
    if header is None:
        raise InputError("perf_analyzer CSV: no data (all files empty)")
    return "\n".join([header, *body]) + "\n"


_CSV_COLUMNS = {
    "concurrency": "Concurrency",
    "throughput": "Inferences/Second",
    "client_send_us": "Client Send",
    "network_server_us": "Network+Server Send/Recv",
    "server_queue_us": "Server Queue",
    "server_compute_input_us": "Server Compute Input",
    "server_compute_infer_us": "Server Compute Infer",
    "server_compute_output_us": "Server Compute Output",
    "client_recv_us": "Client Recv",
    "p50_us": "p50 latency",
    "p90_us": "p90 latency",
    "p95_us": "p95 latency",
    "p99_us": "p99 latency",
}


def _number(value: str, column: str, line: int) -> float:
    try:
        return float(value)
    except ValueError as e:
        raise InputError(f"perf_analyzer CSV: column {column!r} on data row {line} is {value!r}, "
                         "not a number") from e


def parse_csv(text: str) -> list[SweepRow]:
    """Parse perf_analyzer's ``-f`` CSV (with or without ``--verbose-csv``) into rows.

    Rows come back sorted by concurrency (perf_analyzer sorts its file by throughput).
    Only the first table is read: perf_analyzer appends nothing else for concurrency
    sweeps, and request-rate files (``Request Rate`` column) are refused explicitly.
    """
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise InputError("perf_analyzer CSV: empty text") from None
    if "Request Rate" in header and "Concurrency" not in header:
        raise InputError("perf_analyzer CSV: this is a request-rate sweep; run with --concurrency-range")
    missing = [name for name in _CSV_COLUMNS.values() if name not in header]
    if missing:
        raise InputError(f"perf_analyzer CSV: missing columns {missing}; header was {header}")
    index = {name: header.index(name) for name in header}
    rows: list[SweepRow] = []
    for line, values in enumerate(reader, start=1):
        if not values or not any(v.strip() for v in values):
            continue
        if len(values) < len(header) - 1:  # metric columns may end in a trailing empty cell
            raise InputError(f"perf_analyzer CSV: data row {line} has {len(values)} cells, header {len(header)}")
        fields = {key: _number(values[index[col]], col, line) for key, col in _CSV_COLUMNS.items()}
        avg = None
        if "Avg latency" in index:
            avg = _number(values[index["Avg latency"]], "Avg latency", line)
        fields["concurrency"] = int(fields["concurrency"])
        rows.append(SweepRow(avg_us=avg, **fields))
    if not rows:
        raise InputError("perf_analyzer CSV: header but no data rows")
    return sorted(rows, key=lambda r: r.concurrency)


_CONCURRENCY_RE = re.compile(r"^Request concurrency:\s*(\d+)", re.M)
_COMPOSING_RE = re.compile(r"^\s*(\S+), version:\s*(\S+)\s*$")
_COUNT_RE = re.compile(r"Inference count:\s*(\d+)")
_EXEC_RE = re.compile(r"Execution count:\s*(\d+)")
_LATENCY_RE = re.compile(
    r"Avg request latency:\s*(\d+)\s*usec\s*\(overhead\s+(\d+)\s*usec\s*\+\s*queue\s+(\d+)\s*usec"
    r"\s*\+\s*compute input\s+(\d+)\s*usec\s*\+\s*compute infer\s+(\d+)\s*usec"
    r"\s*\+\s*compute output\s+(\d+)\s*usec\)")


def parse_console(text: str) -> dict[int, list[ComposingStats]]:
    """Per-composing-model server stats from perf_analyzer's console output.

    Returns ``{concurrency: [ComposingStats, ...]}``; a level without a
    ``Composing models:`` block (a non-ensemble model) is absent.  When a level's block
    appears more than once (``-v`` prints every pass) the last, stable one wins.
    """
    result: dict[int, list[ComposingStats]] = {}
    starts = [(m.start(), int(m.group(1))) for m in _CONCURRENCY_RE.finditer(text)]
    for i, (start, level) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(text)
        block = text[start:end]
        marker = block.rfind("Composing models:")
        if marker >= 0:
            result[level] = _parse_composing_block(block[marker:])
    return result


def _parse_composing_block(block: str) -> list[ComposingStats]:
    # Layout (perf_analyzer 2.60): "  <model>, version: <v>" then indented
    # "Inference count / Execution count / ... / Avg request latency (... breakdown)".
    sections: list[tuple[str, list[str]]] = []
    for line in block.splitlines()[1:]:
        match = _COMPOSING_RE.match(line)
        if match:
            sections.append((match.group(1), []))
        elif line.strip() and line.startswith(" ") and sections:
            sections[-1][1].append(line)
        elif line.strip():
            break  # "Inferences/Second vs. ..." or the next level: block over
    stats: list[ComposingStats] = []
    for model, lines in sections:
        chunk = "\n".join(lines)
        count, execs, timing = _COUNT_RE.search(chunk), _EXEC_RE.search(chunk), _LATENCY_RE.search(chunk)
        if not (count and execs and timing):
            raise InputError(f"perf_analyzer output: composing model {model!r} block has no "
                             f"count/latency breakdown; got:\n{chunk}")
        total, overhead, queue, c_in, c_infer, c_out = (float(g) for g in timing.groups())
        stats.append(ComposingStats(model=model, inference_count=int(count.group(1)),
                                    execution_count=int(execs.group(1)), latency_us=total,
                                    overhead_us=overhead, queue_us=queue, compute_input_us=c_in,
                                    compute_infer_us=c_infer, compute_output_us=c_out))
    return sorted(stats, key=lambda s: s.model)


def attach_composing(rows: Iterable[SweepRow], composing: dict[int, list[ComposingStats]]) -> None:
    """Set each row's ``composing`` list from :func:`parse_console`'s result."""
    for row in rows:
        row.composing = composing.get(row.concurrency, [])
