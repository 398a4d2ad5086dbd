"""The e5 vocabulary under its two engines: the ``tokenizers`` library and SentencePiece
(``xmsearch.unigram``, what ``TextPreprocessor`` uses for it).

Per engine: what loading costs a fresh process (resident memory added, seconds; each load in
its own subprocess, three times), and how fast it encodes the demo catalogue's texts with the
query prefix, one text per call (a lone query, as the served text encoder gets it) and 64 per
call (a batch of titles), in rounds that alternate the two engines.  Both must give the same
ids on these texts, which is checked first.

    .venv/bin/python -m benchmarks.tokenizer_engines --out benchmarks/results/tokenizer_engines.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import publish

ENGINES = ("tokenizers", "sentencepiece")
MAX_LENGTH = 64

_LOAD = r"""
import json, re, sys, time
def rss_mb():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
engine, path = sys.argv[1], sys.argv[2]
import tokenizers, sentencepiece  # both imported on both sides: only the load is measured
from xmsearch.unigram import UnigramTokenizer
before, t0 = rss_mb(), time.perf_counter()
if engine == "tokenizers":
    tok = tokenizers.Tokenizer.from_file(path)
else:
    tok = UnigramTokenizer.from_tokenizer_json(json.loads(open(path, encoding="utf-8").read()), 64)
print(json.dumps({"seconds": time.perf_counter() - t0, "mb": rss_mb() - before}))
"""


def load_cost(engine: str, tokenizer_json: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _LOAD, engine, str(tokenizer_json)], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def encoders(tokenizer_json: Path) -> dict:
    """engine -> a function from a list of texts to their ids."""
    import tokenizers

    from xmsearch.unigram import UnigramTokenizer

    hf = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    hf.no_padding()
    hf.enable_truncation(max_length=MAX_LENGTH)
    spm = UnigramTokenizer.from_tokenizer_json(json.loads(tokenizer_json.read_text(encoding="utf-8")), MAX_LENGTH)
    return {"tokenizers": lambda texts: [e.ids for e in hf.encode_batch(texts)],
            "sentencepiece": spm.encode_batch}


def demo_texts(n: int) -> list[str]:
    from xmsearch.demo import generate_demo_catalog

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate_demo_catalog(out, n=n, seed=0, n_queries=n)
        rows = [json.loads(line) for line in (out / "catalog.jsonl").read_text(encoding="utf-8").splitlines()]
        queries = [json.loads(line) for line in (out / "queries.jsonl").read_text(encoding="utf-8").splitlines()]
    texts = [t for r in rows for t in [r["title"], *r.get("alt_titles", [])]]
    return ["query: " + t for t in texts + [q["text"] for q in queries if q.get("text")]]


def run(n: int, rounds: int, loads: int) -> str:
    from xmsearch import e5

    path = e5.locate_e5_sources().tokenizer_path
    texts = demo_texts(n)
    enc = encoders(path)
    ids = {name: f(texts) for name, f in enc.items()}
    same = sum(a == b for a, b in zip(ids["tokenizers"], ids["sentencepiece"]))
    costs = {name: [load_cost(name, path) for _ in range(loads)] for name in ENGINES}
    timing: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for name in (ENGINES if r % 2 == 0 else ENGINES[::-1]):
            for per_call in (1, 64):
                t0 = time.perf_counter()
                for i in range(0, len(texts), per_call):
                    enc[name](texts[i:i + per_call])
                timing.setdefault((name, per_call), []).append((time.perf_counter() - t0) / len(texts) * 1e6)

    def med(vals):
        return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"

    lines = [f"Same ids on {same} of {len(texts)} texts (the demo catalogue's titles and queries, seed 0, "
             f"{n} items, with the query prefix, truncated at {MAX_LENGTH} tokens).", "",
             "| figure | tokenizers | sentencepiece | ratio |", "|---|---:|---:|---:|"]
    for label, key in (("load: resident MB added", "mb"), ("load: seconds", "seconds")):
        vals = {name: [c[key] for c in costs[name]] for name in ENGINES}
        ratio = statistics.median(vals["sentencepiece"]) / statistics.median(vals["tokenizers"])
        lines.append(f"| {label} | {med(vals['tokenizers'])} | {med(vals['sentencepiece'])} | **{ratio:.2f}x** |")
    for per_call in (1, 64):
        a, b = timing[("tokenizers", per_call)], timing[("sentencepiece", per_call)]
        lines.append(f"| encode: us per text, {per_call} per call | {med(a)} | {med(b)} | "
                     f"**{statistics.median(b) / statistics.median(a):.2f}x** |")
    lines += ["", f"Median (min-max): loads over {loads} fresh processes each; encoding over {rounds} rounds "
              "alternating the two engines, in one process."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=500, help="demo catalogue size (default 500)")
    p.add_argument("--rounds", type=int, default=6, help="alternated encoding rounds (default 6)")
    p.add_argument("--loads", type=int, default=3, help="fresh-process loads per engine (default 3)")
    p.add_argument("--out", type=Path, help="also write the table (with this command) to this file")
    args = p.parse_args(argv)
    publish(run(args.items, args.rounds, args.loads), args.out, "benchmarks.tokenizer_engines", argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
