"""A closed-loop load generator: N threads call one function back to back for a fixed time.

Used for everything measured in-process (the client end to end, the PyTorch and ONNX
Runtime baselines), so that served and in-process numbers come from the same clock and
the same statistics.  Each thread starts on its own offset into the inputs and cycles
through them.  The first ``warmup_s`` seconds are run but not counted (first calls pay
for lazy initialisation, thread pools and caches); after that, every call that *finishes*
inside the ``duration_s`` window counts towards throughput and latency percentiles.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import numpy as np

from xmsearch.errors import ConfigError


@dataclass
class LoadResult:
    """One measured point: ``concurrency`` threads, each request carrying ``batch`` queries."""

    label: str
    concurrency: int
    batch: int
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @property
    def queries(self) -> int:
        return self.requests * self.batch

    @property
    def qps(self) -> float:
        """Queries (not requests) per second."""
        return self.queries / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "LoadResult":
        return cls(**data)


def summarise(label: str, latencies_s: Sequence[float], seconds: float, concurrency: int = 1,
              batch: int = 1) -> LoadResult:
    """A :class:`LoadResult` from per-request latencies (seconds) over a ``seconds`` window."""
    if not latencies_s:
        raise ConfigError(f"load '{label}': no request finished inside the {seconds:.1f} s window; "
                          "measure for longer")
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return LoadResult(label=label, concurrency=concurrency, batch=batch, requests=len(ms), seconds=seconds,
                      p50_ms=float(p50), p90_ms=float(p90), p99_ms=float(p99), mean_ms=float(ms.mean()))


def closed_loop(fn: Callable[[Any], object], inputs: Sequence[Any], concurrency: int, duration_s: float,
                label: str, warmup_s: float = 1.0, batch: int = 1) -> LoadResult:
    """Run ``fn(inputs[i])`` from ``concurrency`` threads for ``warmup_s + duration_s`` seconds.

    An exception in any call stops every thread and is re-raised here: a benchmark that
    silently counts failures as fast answers would report nonsense.
    """
    if concurrency < 1 or duration_s <= 0 or not inputs:
        raise ConfigError(f"load '{label}': need concurrency >= 1, duration > 0 and inputs "
                          f"(got {concurrency}, {duration_s}, {len(inputs)} inputs)")
    start_barrier = threading.Barrier(concurrency + 1)
    stop = threading.Event()
    errors: list[BaseException] = []
    finished: list[list[tuple[float, float]]] = [[] for _ in range(concurrency)]
    clock: dict[str, float] = {}

    def worker(slot: int) -> None:
        i = slot * max(1, len(inputs) // concurrency)
        start_barrier.wait()
        end = clock["end"]
        while not stop.is_set():
            t0 = time.perf_counter()
            if t0 >= end:
                break
            try:
                fn(inputs[i % len(inputs)])
            except BaseException as e:  # noqa: BLE001 - re-raised by the caller below
                errors.append(e)
                stop.set()
                return
            finished[slot].append((time.perf_counter(), time.perf_counter() - t0))
            i += 1

    threads = [threading.Thread(target=worker, args=(s,), daemon=True, name=f"load-{label}-{s}")
               for s in range(concurrency)]
    for t in threads:
        t.start()
    begin = time.perf_counter()
    clock["window"] = begin + warmup_s
    clock["end"] = clock["window"] + duration_s
    start_barrier.wait()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    window, end = clock["window"], clock["end"]
    latencies = [lat for rows in finished for done, lat in rows if window <= done <= end]
    return summarise(label, latencies, duration_s, concurrency=concurrency, batch=batch)


def timed_batches(fn: Callable[[Any], object], batches: Sequence[Any], duration_s: float, label: str,
                  batch: int, min_batches: int = 3, warmup_batches: int = 1) -> LoadResult:
    """One thread, one batch per call, back to back: at least ``min_batches`` timed calls
    and as many more as fit in ``duration_s`` (a batch of 32 photos can take longer than a
    short window, and a window with no finished call measures nothing)."""
    if not batches or min_batches < 1:
        raise ConfigError(f"load '{label}': need batches and min_batches >= 1")
    for i in range(warmup_batches):
        fn(batches[i % len(batches)])
    latencies: list[float] = []
    begin = time.perf_counter()
    i = 0
    while len(latencies) < min_batches or time.perf_counter() - begin < duration_s:
        t0 = time.perf_counter()
        fn(batches[i % len(batches)])
        latencies.append(time.perf_counter() - t0)
        i += 1
    return summarise(label, latencies, time.perf_counter() - begin, concurrency=1, batch=batch)


def alternated_figures(measures: dict[str, Callable[[], float]], rounds: int,
                       on_round: Callable[[int, dict[str, list[float]]], None] | None = None
                       ) -> dict[str, list[float]]:
    """The figure each measure returns, one per round; every other round runs them in reverse
    order, so that a machine that slows down or speeds up during the run shifts them alike.
    ``on_round(rnd, figures so far)`` is called after each round."""
    out: dict[str, list[float]] = {name: [] for name in measures}
    for rnd in range(rounds):
        for name in (list(measures) if rnd % 2 == 0 else list(measures)[::-1]):
            out[name].append(measures[name]())
        if on_round:
            on_round(rnd, out)
    return out


def alternated_ms_per_call(calls: dict[str, Callable[[], object]], rounds: int, seconds: float) -> dict[str, list[float]]:
    """Milliseconds per call of each function, one figure per round (:func:`alternated_figures`):
    each is warmed with one call, then called for ``seconds``."""
    def ms_per_call(fn: Callable[[], object]) -> Callable[[], float]:
        def measure() -> float:
            n = 0
            fn()
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                n += 1
            return (time.perf_counter() - t0) / n * 1e3
        return measure

    return alternated_figures({name: ms_per_call(fn) for name, fn in calls.items()}, rounds)


def alternated_median_ms(calls: dict[str, Callable[[], object]], rounds: int, per_round: int, gap_ms: float,
                         cpu_ms: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Per call and round, the median latency in ms of ``per_round`` calls, each after an
    idle pause of ``gap_ms`` (what a client at concurrency 1 sees); rounds alternate the
    order of the calls.  With ``cpu_ms``, also appends to ``cpu_ms[name]`` per round the
    process's CPU ms per call, its idle pause included (all threads)."""
    out: dict[str, list[float]] = {name: [] for name in calls}
    for rnd in range(rounds):
        for name in (list(calls) if rnd % 2 == 0 else list(calls)[::-1]):
            fn = calls[name]
            for _ in range(5):  # warm-up
                fn()
            times = []
            cpu0 = time.process_time()
            for _ in range(per_round):
                time.sleep(gap_ms / 1e3)
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name].append(statistics.median(times) * 1e3)
            if cpu_ms is not None:
                cpu_ms.setdefault(name, []).append((time.process_time() - cpu0) / per_round * 1e3)
    return out


def ab_table(points: dict[tuple[str, str], list[float]], before: str, after: str) -> str:
    """Markdown table of an alternated A/B: per metric, the median (min-max) over rounds of
    variant ``before`` and ``after`` and their ratio.  ``points`` maps (variant, metric) to
    one figure per round; metrics keep their first-seen order."""
    lines = [f"| measure | {before} | {after} | ratio |", "|---|---:|---:|---:|"]
    for metric in dict.fromkeys(m for _, m in points):
        b, a = points[(before, metric)], points[(after, metric)]
        mb, ma = statistics.median(b), statistics.median(a)
        lines.append(f"| {metric} | {mb:.2f} ({min(b):.2f}-{max(b):.2f}) | {ma:.2f} ({min(a):.2f}-{max(a):.2f}) "
                     f"| {ma / mb:.2f}x |")
    return "\n".join(lines)


def ratio_table(label: str, unit: str, figures: dict[str, list[float]], digits: int = 3) -> str:
    """Markdown table of alternated variants: per variant (rows in ``figures``' order) the
    median (min-max) of its figures in ``unit`` and the ratio of that median to the first
    variant's.  ``label`` heads the variant column."""
    base = statistics.median(next(iter(figures.values())))
    lines = [f"| {label} | {unit}, median (min-max) | ratio |", "|---|---:|---:|"]
    for name, xs in figures.items():
        m = statistics.median(xs)
        lines.append(f"| {name} | {m:.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f}) | {m / base:.2f}x |")
    return "\n".join(lines)
