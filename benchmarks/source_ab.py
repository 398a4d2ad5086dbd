"""Serving speed of two source trees side by side: for a change that is code, not a config field.

``benchmarks.serving_ab`` compares config variants of one exported repository; a change to
what the members compute or exchange (a tensor's dtype, a preprocessing step) needs each side
exported *and* served by its own code.  This takes a git revision for the reference side,
assembles its ``xmsearch`` package (with ``export`` and ``client`` inside, as the editable
install maps them) in a work folder, exports a cpu repository with it in a subprocess and
links the package into each member's folder, where the python-backend stubs import it ahead of
the installed one; the other side is the working tree, exported as ``make bench`` does.  Both servers run at once and are
measured in alternating order, as in ``serving_ab``: ``query_text`` / ``query_image`` p50 at
concurrency 1 and infer/s at 16 (perf_analyzer), the catalogue ingest's items/s and CPU
milliseconds per item (server tree and main members' stubs, ``serving_ab.INGEST_CPU_ROWS``),
server memory.
The requests (texts, encoded photos) are the same bytes on both sides.

    .venv/bin/python -m benchmarks.source_ab --base ca2b95c --rounds 5 --items 900 \\
        --out benchmarks/results/source_ab_uint8_pixels.md
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from benchmarks import input_data, perf_sweep, proc_cpu, publish, stack
from benchmarks.e2e import measure_ingest
from benchmarks.serving_ab import (KINDS, LEVELS, Variant, alternate_rounds, measure_queries, record_ingest,
                                   report_text)
from xmsearch.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# Where the editable install puts the subpackages that live outside xmsearch/ (pyproject.toml).
SUBPACKAGES = {"export": "export", "client": "client"}


def assemble_package(tree: Path, out: Path) -> Path:
    """``out``/xmsearch: ``tree``'s xmsearch/ with its export/ and client/ folders inside, the
    layout the editable install maps; ``out`` goes first on PYTHONPATH to import that code."""
    if not (tree / "xmsearch" / "__init__.py").is_file():
        raise ConfigError(f"{tree}: no xmsearch/__init__.py there: not a checkout of this project")
    pkg = out / "xmsearch"
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(tree / "xmsearch", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name, folder in SUBPACKAGES.items():
        if (tree / folder).is_dir():
            shutil.copytree(tree / folder, pkg / name, ignore=shutil.ignore_patterns("__pycache__"))
    return out


def checkout(revision: str, out: Path) -> Path:
    """The files of ``revision`` of this repository in ``out`` (git archive: no worktree)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True,
                                 capture_output=True).stdout
    except subprocess.CalledProcessError as e:
        raise ConfigError(f"--base {revision}: {e.stderr.decode(errors='replace').strip() or e}") from None
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


EXPORT = """
import sys, xmsearch
from pathlib import Path
from xmsearch.export.pipeline import export_repository
assert Path(xmsearch.__file__).resolve().is_relative_to(Path(sys.argv[2]).resolve()), xmsearch.__file__
export_repository(Path(sys.argv[1]), target="cpu", untrained=True, text_model=sys.argv[3])
"""


def export_with(package_root: Path, out: Path, text_model: str) -> Path:
    """Export an untrained cpu repository into ``out`` with the code under ``package_root``,
    and link that code into every python-backend member's version folder: the stub puts the
    folder on its ``sys.path``, where the package is found before the editable install's finder
    is asked, as long as the server's working directory (the stub's first ``sys.path`` entry,
    ahead of ``PYTHONPATH``) holds no ``xmsearch`` of its own (``main`` serves from the work
    folder)."""
    env = dict(os.environ, PYTHONPATH=str(package_root))
    subprocess.run([sys.executable, "-c", EXPORT, str(out), str(package_root), text_model],
                   check=True, env=env, cwd=package_root)
    return link_package(package_root, out)


def link_package(package_root: Path, repository: Path) -> Path:
    """Link ``package_root``/xmsearch into the version folder of every python-backend member
    of ``repository`` (those with a ``model.py``); returns ``repository``."""
    target = (package_root / "xmsearch").resolve()
    for shim in sorted(repository.glob("*/[0-9]*/model.py")):
        link = shim.parent / "xmsearch"
        if link.is_symlink() or link.exists():
            raise ConfigError(f"{link} exists already: the member folder has an xmsearch of its own")
        link.symlink_to(target, target_is_directory=True)
    return repository


def measure(v: Variant, url: str, pid: int, inputs: dict[str, Path], catalog_file: Path,
            work: Path, settings: perf_sweep.SweepSettings) -> None:
    """One round of ``v``'s figures from the server at ``url`` whose process is ``pid``."""
    measure_queries(v, url, inputs, work, settings)
    record_ingest(v, measure_ingest(catalog_file, work / f"index-{v.name}", url, server_pid=pid))
    if megabytes := proc_cpu.tree_pss_mb(pid):
        v.figures.setdefault("server memory MB (PSS)", []).append(megabytes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--base", required=True, help="git revision of the reference side (e.g. main)")
    p.add_argument("--rounds", type=int, default=3, help="measurements per side (default 3)")
    p.add_argument("--items", type=int, default=300, help="demo catalogue size (default 300)")
    p.add_argument("--interval-ms", type=int, default=2000, help="perf_analyzer window (default 2000)")
    p.add_argument("--text-model", default="minilm-l6", help="text encoder of both repositories")
    p.add_argument("--work", type=Path, help="work folder (default: a temporary folder)")
    p.add_argument("--out", type=Path, help="also write the table (with this command) to this file")
    a = p.parse_args(argv)
    work = (a.work or Path(tempfile.mkdtemp(prefix="xmsearch-source-ab-"))).resolve()
    try:
        base_pkg = assemble_package(checkout(a.base, work / "base-tree"), work / "base-package")
    except ConfigError as e:
        p.error(str(e))
    print(f"exporting with {a.base} ...", flush=True)
    base_repo = export_with(base_pkg, work / "repo-base", a.text_model)
    here_repo = stack.exported_repository(text_model=a.text_model, step=lambda m: print(m, flush=True)).path
    cat = stack.demo_catalogue(a.items, max(30, a.items // 3))
    inputs = {k: input_data.write_input_data(work / f"{k}.json", cat.queries_file, k) for k in KINDS}
    settings = perf_sweep.SweepSettings(concurrency=LEVELS, measurement_interval_ms=a.interval_ms,
                                        stability_percentage=30.0, max_trials=5)
    variants = [Variant(a.base, []), Variant("working tree", [])]
    t0 = time.perf_counter()
    here = Path.cwd()
    os.chdir(work)  # the stubs' first sys.path entry: not a checkout with an xmsearch/ folder
    with ExitStack() as servers:
        servers.callback(os.chdir, here)
        served = {v.name: servers.enter_context(stack.PrivateServer(repo, log_file=work / f"{v.name}.log"))
                  for v, repo in zip(variants, (base_repo, here_repo))}
        alternate_rounds(variants, a.rounds, lambda v: measure(v, served[v.name].url, served[v.name].server.pid,
                                                               inputs, cat.catalog_file, work, settings))
    described = f"- `{a.base}`: exported and served by that revision's code\n- `working tree`: this checkout"
    publish(report_text(described, variants, a.rounds, "both", cat.n_items, t0, a.text_model), a.out,
            "benchmarks.source_ab", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
