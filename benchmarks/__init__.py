"""xmsearch benchmarks: perf_analyzer sweeps, FAISS index benchmark, report and plots.

Run ``python -m benchmarks.run --help`` from the repository root.
"""

import os as _os

# On a shared 2-core machine OpenMP's default busy-waiting makes FAISS threads spin
# against each other and other processes (PQ training measured 3.5x slower).  This must be
# set before the OpenMP runtime starts, i.e. before faiss is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def publish(text: str, path, module: str, argv) -> None:
    """Print a small benchmark's result ``text`` and, when ``path`` is given, write it there
    under the command that made it (``argv``: the arguments given to ``main``, None for the
    process's own)."""
    import sys
    from pathlib import Path

    print(text)
    if path:
        args = list(argv) if argv is not None else sys.argv[1:]
        Path(path).write_text(f"$ python -m {module} {' '.join(args)}\n\n{text}\n")


def catalogue_parser(doc: str, *, fusion: str | None = None, seconds: bool = True, rounds: int = 6,
                     photos: int | None = None):
    """The options of the small benchmarks that time calls on a catalogue's items:
    ``--catalog`` (default ``demo``), ``--rounds`` (default ``rounds``), ``--seconds`` (unless
    ``seconds`` is false: a benchmark whose rounds are a fixed amount of work), ``--out``, with
    ``fusion`` (its help text) an optional ``--fusion`` checkpoint, and with ``photos`` an
    ``--items`` count of catalogue photos per round (default ``photos``).  The module's docstring
    (``doc``) gives the description and the epilog.  :func:`parse_catalogue_args` parses and
    checks them."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc)
    p.add_argument("--catalog", type=Path, default=Path("demo"),
                   help="catalogue folder with catalog.jsonl (default: demo)")
    if fusion:
        p.add_argument("--fusion", type=Path, help=fusion)
    p.add_argument("--rounds", type=int, default=rounds)
    if photos is not None:
        p.add_argument("--items", type=int, default=photos, help=f"catalogue photos per round (default: {photos})")
    if seconds:
        p.add_argument("--seconds", type=float, default=1.0, help="timed seconds per variant and round")
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    return p


def parse_catalogue_args(p, argv):
    """``p.parse_args(argv)``, refusing a catalogue folder without catalog.jsonl, a ``--fusion``
    checkpoint that does not exist, and fewer than one round (or photo per round)."""
    a = p.parse_args(argv)
    if a.rounds < 1 or getattr(a, "items", 1) < 1:
        p.error("--rounds" + (" and --items" if hasattr(a, "items") else "") + " must be >= 1")
    if not (a.catalog / "catalog.jsonl").is_file():
        p.error(f"--catalog {a.catalog}: no catalog.jsonl there (make one with `xmsearch demo-catalog`)")
    if getattr(a, "fusion", None) is not None and not a.fusion.is_file():
        p.error(f"--fusion {a.fusion} does not exist (train one with `xmsearch train`, or run `make demo`)")
    return a
