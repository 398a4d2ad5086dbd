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
