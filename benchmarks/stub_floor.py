"""What a served text query costs before any model runs: the gRPC + python-backend floor.

On the cpu target every member is a python-backend model (the bundled tritonserver has no
ONNX Runtime backend), so a ``query_text`` request pays one gRPC round trip, the ensemble
scheduler and a stub round trip per step on top of the work itself: three steps (tokenizer,
text encoder, fusion) until the text encoder member learnt to tokenize and run the fusion
head itself, one since (``xmsearch.spec.ensemble_specs``). This serves a repository of
do-nothing python models (identity on a 16-float row, ``dynamic_batching`` as the real members
have it) and times, one request at a time with an idle pause before each as a client at
concurrency 1 would: the bare member, an ensemble of one such step and an ensemble of three.
With ``--repository`` it also serves an exported cpu repository and times its ``query_text``
ensemble and the three members of the three-step path (called directly), plus the same
tokenize-encode-fuse path in process with ONNX Runtime as the members run it (two threads
that sleep when idle) and with ONNX Runtime's defaults (spinning threads: baseline (c) of
``benchmarks.run``). Rounds alternate; each figure is the median of a round, the table the
median (min-max) over rounds.

    .venv/bin/python -m benchmarks.stub_floor --repository benchmarks/.cache/repository-minilm-l6 \\
        --out benchmarks/results/stub_floor.md
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

from benchmarks import publish
from benchmarks.loadgen import alternated_median_ms, ratio_table

NULL_STEPS = 3
ROW = 16  # floats per request: about what a short query's token ids weigh
NULL_MODEL = '''"""A do-nothing python-backend member (benchmarks.stub_floor): returns its input."""
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
'''
QUERY = "blue down jacket"


def null_repository(root: Path, steps: int = NULL_STEPS) -> list[str]:
    """Write ``null_1 .. null_<steps>`` and the ensembles ``chain_1`` / ``chain_<steps>`` into
    ``root``; returns the names to time, cheapest first."""
    from tritonclient.grpc import model_config_pb2 as mc

    from benchmarks.stack import toy_chain, toy_io, toy_member

    members = [f"null_{i}" for i in range(1, steps + 1)]
    for name in members:
        toy_member(root, name, NULL_MODEL, [toy_io(mc.ModelInput, "X")], [toy_io(mc.ModelOutput, "Y")])
    chains = []
    for length in sorted({1, steps}):
        chain = [(member, {"X": "X" if i == 0 else f"t{i}"}, {"Y": "Y" if i == length - 1 else f"t{i + 1}"})
                 for i, member in enumerate(members[:length])]
        toy_chain(root, f"chain_{length}", chain, [toy_io(mc.ModelInput, "X")], [toy_io(mc.ModelOutput, "Y")])
        chains.append(f"chain_{length}")
    return [members[0], *chains]


def _caller(url: str, model: str, inputs: dict) -> Callable[[], object]:
    """One synchronous gRPC inference of ``model`` with ``inputs`` (name -> numpy array)."""
    import tritonclient.grpc as grpcclient

    from xmsearch.client.triton import infer_inputs

    client = grpcclient.InferenceServerClient(url)
    tensors = infer_inputs(inputs)  # built once: only the round trip is timed
    return lambda: client.infer(model, tensors)


def served_text_calls(url: str, repository: Path) -> dict[str, Callable[[], object]]:
    """``query_text`` and the three members of the three-step path, each called with real
    inputs of one query; where the text encoder reads TEXT itself (the cpu target's one-step
    ``query_text``), also that call."""
    import numpy as np

    from xmsearch import spec as S
    from xmsearch.export.repository import read_config
    from xmsearch.preprocess import TextPreprocessor

    pre = TextPreprocessor.from_dir(S.query_tokenizer_folder(repository))
    ids, mask = (np.asarray(a) for a in pre.encode([QUERY], "query"))
    text = np.array([[QUERY.encode()]], dtype=object)
    encode = _caller(url, S.TEXT_ENCODER, {S.INPUT_IDS: ids, S.ATTENTION_MASK: mask})
    states = encode().as_numpy(S.TOKEN_STATES)
    calls = {}
    if (repository / S.TOKENIZER_QUERY).is_dir():  # GPU targets; the cpu target tokenizes in the text encoder
        calls[f"{S.TOKENIZER_QUERY} (member)"] = _caller(url, S.TOKENIZER_QUERY, {S.TEXT: text})
    calls[f"{S.TEXT_ENCODER} (member, ids in)"] = encode
    calls[f"{S.FUSION_TEXT} (member)"] = _caller(url, S.FUSION_TEXT, {S.TOKEN_STATES: states, S.ATTENTION_MASK: mask})
    if S.TEXT in {i.name for i in read_config(repository / S.TEXT_ENCODER / "config.pbtxt").input}:
        calls[f"{S.TEXT_ENCODER} (member, text in)"] = _caller(url, S.TEXT_ENCODER, {S.TEXT: text})
    steps = [s.model_name for s in read_config(repository / S.QUERY_TEXT / "config.pbtxt").ensemble_scheduling.step]
    calls[f"{S.QUERY_TEXT} (ensemble: {' -> '.join(steps)})"] = _caller(url, S.QUERY_TEXT, {S.TEXT: text})
    return calls


def in_process_text_calls(repository: Path) -> dict[str, Callable[[], object]]:
    """Tokenize, encode and fuse one query in this process, as served and as baseline (c)."""
    import numpy as np

    from xmsearch import spec as S
    from xmsearch.export.onnx import onnx_session
    from xmsearch.preprocess import TextPreprocessor

    pre = TextPreprocessor.from_dir(S.query_tokenizer_folder(repository))

    def path(enc, fus):
        def run():
            ids, mask = (np.asarray(a) for a in pre.encode([QUERY], "query"))
            states = enc.run(None, {S.INPUT_IDS: ids, S.ATTENTION_MASK: mask})[0]
            return fus.run(None, {S.TOKEN_STATES: states, S.ATTENTION_MASK: mask})
        return run

    graphs = [repository / m / "1" / "model.onnx" for m in (S.TEXT_ENCODER, S.FUSION_TEXT)]
    served = [onnx_session(g, threads=2, spinning=False) for g in graphs]
    default = [onnx_session(g) for g in graphs]
    return {"in process, ONNX Runtime as served (2 threads, not spinning)": path(*served),
            "in process, ONNX Runtime defaults (baseline (c))": path(*default)}


def run(repository: Path | None, rounds: int, per_round: int, gap_ms: float, work: Path | None = None) -> str:
    import numpy as np

    from benchmarks.stack import PrivateServer

    if repository is not None and not (repository / "query_text" / "config.pbtxt").is_file():
        raise SystemExit(f"--repository {repository}: no query_text ensemble there; export a cpu repository "
                         "first (make bench caches one under benchmarks/.cache)")
    with tempfile.TemporaryDirectory(prefix="xmsearch-stub-floor-", dir=work) as tmp:
        root = Path(tmp)
        names = null_repository(root / "null")
        row = np.zeros((1, ROW), np.float32)
        with PrivateServer(root / "null", log_file=root / "null.log") as null:
            labels = {names[0]: "null member (gRPC + one python stub)", names[1]: "ensemble of 1 null step",
                      names[2]: f"ensemble of {NULL_STEPS} null steps"}
            calls = {labels[n]: _caller(null.url, n, {"X": row}) for n in names}
            if repository is None:
                figures = alternated_median_ms(calls, rounds, per_round, gap_ms)
            else:
                with PrivateServer(repository, log_file=root / "text.log") as served:
                    calls.update(served_text_calls(served.url, repository))
                    calls.update(in_process_text_calls(repository))
                    figures = alternated_median_ms(calls, rounds, per_round, gap_ms)
    what = f"and `{repository.name}`'s text path " if repository is not None else ""
    return (f"Do-nothing python-backend models {what}one request at a time, {gap_ms:g} ms idle before "
            f"each, {per_round} calls per round, {rounds} alternated rounds; the rounds' medians "
            "(ratio: to the first row).\n\n" + ratio_table("call", "ms", figures))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--repository", type=Path,
                   help="also time this exported cpu repository's query_text path, served and in process")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=200, help="timed calls per row and round (default 200)")
    p.add_argument("--gap-ms", type=float, default=2.0, help="idle pause before each call (default 2)")
    p.add_argument("--work", type=Path, help="folder for the temporary repository and logs")
    p.add_argument("--out", type=Path, help="also write the result here, under the command")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.calls < 1:
        p.error("--rounds and --calls must be 1 or more")
    publish(run(a.repository, a.rounds, a.calls, a.gap_ms, a.work), a.out, "benchmarks.stub_floor", argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
