"""xmsearch benchmarks: perf_analyzer sweeps, FAISS index benchmark, report and plots.

Run ``python -m benchmarks.run --help`` from the repository root.
"""

import os as _os

# On a shared 2-core machine OpenMP's default busy-waiting makes FAISS threads spin
# against each other and other processes (PQ training measured 3.5x slower).  This must be
# set before the OpenMP runtime starts, i.e. before faiss is first imported.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
