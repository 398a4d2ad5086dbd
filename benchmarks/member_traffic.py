"""What a tensor costs the server on its way between two python-backend members of an ensemble.

On the cpu target every member is a python-backend stub, so each tensor one step hands the next
is copied through shared memory: out of the producing stub, through the server, into the
consuming one.  This serves pairs of do-nothing members chained by an ensemble, ``make_<case>``
(a 16-float row in, a ``[K]`` tensor of the case's dtype out) and ``take_<case>`` (that tensor
in, a 16-float row out), sends batches of 8 rows with 4 requests in flight, and reports the CPU
milliseconds per row that the server's process tree spent, rounds alternated.  The cases are
the tensors of the image path: a photo's pixels as float32 and as uint8, and its regions at the
encoder's width and at the fusion module's PCA width; ``tiny`` is the floor of the two steps.

    .venv/bin/python -m benchmarks.member_traffic --out benchmarks/results/member_traffic.md
"""

from __future__ import annotations

import argparse
import tempfile
import threading
from pathlib import Path

from benchmarks import publish
from benchmarks.loadgen import ratio_table

# name -> (Triton dtype, numpy dtype, elements per row)
CASES = {
    "tiny": ("TYPE_FP32", "float32", 16),
    "pixels float32 [3,224,224]": ("TYPE_FP32", "float32", 3 * 224 * 224),
    "pixels uint8 [3,224,224]": ("TYPE_UINT8", "uint8", 3 * 224 * 224),
    "regions float32 [49,1800]": ("TYPE_FP32", "float32", 49 * 1800),
    "regions float32 [49,256]": ("TYPE_FP32", "float32", 49 * 256),
}
MAKE = '''"""benchmarks.member_traffic: a row of {elements} x {dtype} per request row."""
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            rows = pb.get_input_tensor_by_name(r, "X").as_numpy().shape[0]
            out.append(pb.InferenceResponse([pb.Tensor("T", np.ones((rows, {elements}), np.{dtype}))]))
        return out
'''
TAKE = '''"""benchmarks.member_traffic: reads the tensor, answers a 16-float row per request row."""
import numpy as np
import triton_python_backend_utils as pb


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            t = pb.get_input_tensor_by_name(r, "T").as_numpy()
            out.append(pb.InferenceResponse([pb.Tensor("Y", np.full((t.shape[0], 16), float(t[0, -1]), np.float32))]))
        return out
'''
ROWS, IN_FLIGHT = 8, 4


def slug(case: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in case).strip("_")


def traffic_repository(root: Path, cases: dict[str, tuple[str, str, int]] = CASES) -> dict[str, str]:
    """Write the make/take members and one ensemble per case into ``root``; case -> ensemble."""
    from tritonclient.grpc import model_config_pb2 as mc

    from benchmarks.stack import toy_chain, toy_io, toy_member

    chains = {}
    for case, (triton_dtype, np_dtype, elements) in cases.items():
        s = slug(case)
        tensor = (triton_dtype, (elements,))
        toy_member(root, f"make_{s}", MAKE.format(elements=elements, dtype=np_dtype),
                   [toy_io(mc.ModelInput, "X")], [toy_io(mc.ModelOutput, "T", *tensor)])
        toy_member(root, f"take_{s}", TAKE, [toy_io(mc.ModelInput, "T", *tensor)], [toy_io(mc.ModelOutput, "Y")])
        toy_chain(root, f"chain_{s}", [(f"make_{s}", {"X": "X"}, {"T": "t"}), (f"take_{s}", {"T": "t"}, {"Y": "Y"})],
                  [toy_io(mc.ModelInput, "X")], [toy_io(mc.ModelOutput, "Y")])
        chains[case] = f"chain_{s}"
    return chains


def run(rounds: int, requests: int, cases: dict[str, tuple[str, str, int]] = CASES,
        work: Path | None = None) -> str:
    import numpy as np
    import tritonclient.grpc as grpcclient

    from benchmarks import proc_cpu
    from benchmarks.stack import PrivateServer
    from xmsearch.client.triton import infer_inputs

    per_thread = max(1, requests // IN_FLIGHT)
    x = np.zeros((ROWS, 16), np.float32)

    def send(url: str, model: str, n: int) -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = infer_inputs({"X": x})
        try:
            for _ in range(n):
                client.infer(model, inputs)
        finally:
            client.close()

    with tempfile.TemporaryDirectory(prefix="xmsearch-member-traffic-", dir=work) as tmp:
        chains = traffic_repository(Path(tmp) / "repo", cases)
        ms: dict[str, list[float]] = {case: [] for case in chains}
        with PrivateServer(Path(tmp) / "repo", log_file=Path(tmp) / "server.log") as server:
            pid = server.server.pid
            for r in range(rounds):
                for case in (list(chains) if r % 2 == 0 else list(chains)[::-1]):
                    send(server.url, chains[case], 4)  # warm the stubs and the shared-memory pools
                    before = proc_cpu.tree_cpu_seconds(pid)
                    threads = [threading.Thread(target=send, args=(server.url, chains[case], per_thread))
                               for _ in range(IN_FLIGHT)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                    after = proc_cpu.tree_cpu_seconds(pid)
                    cpu_s = sum(after.values()) - sum(before.values())
                    ms[case].append(cpu_s * 1e3 / (per_thread * IN_FLIGHT * ROWS))
    kb = {case: elements * np.dtype(np_dtype).itemsize / 1024 for case, (_, np_dtype, elements) in cases.items()}
    figures = {f"{case}, {kb[case]:.0f} KB": v for case, v in ms.items()}
    return (f"Two do-nothing python-backend steps in an ensemble, the first handing the second one tensor "
            f"per row; {ROWS} rows per request, {IN_FLIGHT} requests in flight, {per_thread * IN_FLIGHT} "
            f"requests per case and round, {rounds} alternated rounds; CPU of the server's process tree "
            "(server and stubs) per row; ratios to the first row.\n\n"
            + ratio_table("tensor between the steps", "CPU ms per row", figures))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=300, help="requests per case and round (default 300)")
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    a = p.parse_args(argv)
    publish(run(a.rounds, a.requests), a.out, "benchmarks.member_traffic", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
