"""CPU time and memory of a local tritonserver and its python-backend stubs, by model (Linux ``/proc``).

Throughput says how fast an ingest went; CPU per item says where the cores went and what
the cores allow at best.  Each python-backend model instance is a stub process whose
command line names the model's ``<repository>/<model>/1/model.py``; the server's own
threads (gRPC, ensemble scheduling, the dynamic batchers) count as ``tritonserver``.

    before = tree_cpu_seconds(server_pid)
    ...  # the work
    per_item = cpu_per_item(before, tree_cpu_seconds(server_pid), items)
    megabytes = tree_pss_mb(server_pid)  # resident memory, shared pages split between sharers
"""

from __future__ import annotations

import os
from pathlib import Path

SERVER = "tritonserver"
_PROC = Path("/proc")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of a live process, None once it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces and ')'
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def _label(pid: int) -> str:
    try:
        args = (_PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return "other"
    for a in args:
        p = Path(a.decode(errors="replace"))
        if p.name == "model.py" and p.parent.name.isdigit():
            return p.parent.parent.name  # <repository>/<model>/<version>/model.py
    return Path(args[0].decode(errors="replace")).name or "other"


def _tree(root: int) -> dict[int, tuple[str, float]]:
    """Process ``root`` and its live descendants: pid -> (label, CPU seconds); the root is
    labelled ``tritonserver``, a stub by its model.  Empty where ``/proc`` cannot be read
    (not Linux) or ``root`` is gone."""
    if not (_PROC / str(root)).is_dir():
        return {}
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)], cpu[int(entry.name)] = st
    out: dict[int, tuple[str, float]] = {}
    for pid, seconds in cpu.items():
        p, depth = pid, 0
        while p not in (root, 0, 1) and depth < 64:  # climb to the root, if it is an ancestor
            p, depth = parents.get(p, 0), depth + 1
        if p == root:
            out[pid] = (SERVER if pid == root else _label(pid), seconds)
    return out


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """Cumulative CPU seconds of process ``root`` (as ``tritonserver``) and of every live
    descendant, summed by model name (instances of one model add up).  Empty where
    ``/proc`` cannot be read (not Linux) or ``root`` is gone."""
    out: dict[str, float] = {}
    for label, seconds in _tree(root).values():
        out[label] = out.get(label, 0.0) + seconds
    return out


def _pss_kb(pid: int) -> int:
    try:
        for line in (_PROC / str(pid) / "smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_mb(root: int) -> float:
    """Proportional set size of process ``root`` and its live descendants together, in MB
    (2**20 bytes): the memory a server and its stubs hold, each shared page split among the
    processes that map it (so one shared only within the tree counts once).  0 where
    ``/proc`` cannot be read or ``root`` is gone."""
    return sum(_pss_kb(pid) for pid in _tree(root)) / 1024


def cpu_per_item(before: dict[str, float], after: dict[str, float], items: int) -> dict[str, float]:
    """CPU milliseconds per item of each label between two snapshots, largest first; labels
    that used no measurable CPU are left out."""
    if items <= 0:
        return {}
    diff = {k: (after[k] - before.get(k, 0.0)) * 1e3 / items for k in after}
    return dict(sorted(((k, v) for k, v in diff.items() if v > 0), key=lambda kv: -kv[1]))
