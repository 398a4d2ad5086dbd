"""The client half of the ``xmsearch`` command line: index, search, delete, eval."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _embedder(a: argparse.Namespace, retries: int = 3):
    from xmsearch.client.embed import Embedder

    return Embedder(a.url, timeout_s=a.timeout, retries=retries)


def _location(text: str) -> str | Path:
    """An index directory, or a Milvus location kept as text (``Path`` would fold the ``//``
    of ``milvus:http://...``; :func:`xmsearch.client.stores.parse_location` reads it)."""
    return text if text.startswith("milvus:") else Path(text)


def _output_files(**paths: Path | None) -> None:
    """Make ready the files a command writes at its end (``option=path``; None: not asked for):
    their folders are created, and a path that is a folder, or whose folder cannot be made,
    is refused by its option before any query runs, not after the last one."""
    from xmsearch.errors import InputError

    for option, path in paths.items():
        if path is None:
            continue
        flag = "--" + option.replace("_", "-")
        if Path(path).is_dir():
            raise InputError(f"{flag} {path} is a folder; give a file name")
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{flag} {path}: cannot make its folder ({e.strerror or e})") from None


def cmd_index(a: argparse.Namespace, bar_factory) -> int:
    from xmsearch.client.ingest import ingest_catalog

    emb = _embedder(a, retries=a.retries)
    bar = None
    started = time.time()

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:  # drawn from the first report on (an error before it prints alone)
            bar = bar_factory("indexing", total)
            bar.start_t = started  # its rate counts from the ingest's start, not this first chunk's end
        bar.n = done
        bar.refresh()

    try:
        report = ingest_catalog(a.catalog, a.out, emb, factory=a.factory, resume=a.resume, add=a.add,
                                gpu=a.gpu, chunk_size=a.chunk_size, request_rows=a.request_rows,
                                in_flight=a.in_flight, nprobe=a.nprobe, ef_search=a.ef_search,
                                photo_views=a.photo_views, alt_titles=a.alt_titles, progress=progress)
    finally:
        if bar is not None:
            bar.close()
        emb.close()
    for b in report.bad:
        print(f"skipped {b}")
    print(f"{a.out}: {report.summary()}")
    return 0


def cmd_search(a: argparse.Namespace, _bar) -> int:
    from xmsearch.client.search import Searcher, parse_filters

    _output_files(sheet=a.sheet)
    emb = _embedder(a)
    try:
        searcher = Searcher(a.index, emb)
        try:
            hits = searcher.search(a.text, a.image, a.k, parse_filters(a.filter) if a.filter else None)
        finally:
            searcher.close()
    finally:
        emb.close()
    if a.sheet:
        from xmsearch.plots import results_sheet

        sheet = results_sheet(hits, a.sheet, query_text=a.text, query_image=a.image)
        if not a.json:
            print(f"wrote {sheet}")
    if a.json:
        print(json.dumps([{"id": h.id, "score": round(float(h.score), 5), **h.metadata} for h in hits],
                         ensure_ascii=False, indent=2))
        return 0
    for rank, h in enumerate(hits, start=1):
        attrs = ", ".join(f"{k}={v}" for k, v in h.metadata.items()
                          if k not in ("title", "image", "alt_titles"))
        print(f"{rank:3d}. {h.score:6.3f}  {h.id:10s} {h.metadata.get('title', '')}"
              + (f"  [{attrs}]" if attrs else ""))
    if not hits:
        print("no results")
    return 0


def cmd_delete(a: argparse.Namespace, _bar) -> int:
    from xmsearch.client.stores import open_index

    index = open_index(a.index)
    try:
        n = index.delete(a.ids, missing_ok=a.missing_ok)
        index.save()
    finally:
        index.close()
    print(f"deleted {n} items from {a.index}")
    return 0


def cmd_eval(a: argparse.Namespace, bar_factory) -> int:
    from xmsearch import evaluate as ev
    from xmsearch.client.search import Searcher

    _output_files(json=a.json, plot=a.plot, per_query=a.per_query)
    queries = ev.load_queries(a.queries)
    emb = _embedder(a)
    searcher = Searcher(a.index, emb)
    bar = bar_factory("queries", len(queries))
    try:
        hits = ev.served_hits(searcher, queries, progress=lambda d, t: (setattr(bar, "n", d), bar.refresh()))
        metadata = ev.top_grade_metadata(searcher.index, queries)
    finally:
        bar.close()
        searcher.close()
        emb.close()
    served = ev.ranked_ids(hits)
    baselines = None
    if a.baselines:
        catalog = a.catalog or Path(a.queries).parent / "catalog.jsonl"
        baselines = ev.run_baselines(catalog, queries, a.text_model, a.image_model)
    table = ev.report(served, queries, baselines)
    rows = ev.per_query_rows(hits, queries, metadata=metadata)
    if any(r["asked"] for r in rows):
        print(ev.format_miss_table(ev.miss_table(rows)))
    if a.json:
        Path(a.json).write_text(json.dumps(table, indent=2))
        print(f"wrote {a.json}")
    if a.per_query:
        print(f"wrote {ev.write_per_query(rows, a.per_query)} ({len(rows)} queries, the worst nDCG@10 first; "
              f"{sum(r['recall@10'] == 0 for r in rows)} without a top-grade item in their first 10)")
    if a.plot:
        from xmsearch.plots import evaluation_chart

        print(f"wrote {evaluation_chart(table, a.plot, title=f'retrieval quality: {Path(a.queries).name}')}")
    return 0


def add_commands(sub, url_arg, bar_factory) -> None:
    """Register the client subcommands on the main parser's subparsers."""
    from xmsearch.spec import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL

    def bind(fn):
        return lambda a: fn(a, bar_factory)

    i = sub.add_parser("index", help="embed a catalogue through the server into a FAISS index (or Milvus)",
                       description="Stream a catalogue (JSONL or CSV with id, title, image, attributes) "
                                   "through the item ensemble and write a FAISS index, the id map and a "
                                   "SQLite metadata store into OUT, or the items into a Milvus collection "
                                   "(OUT = milvus:URI[#COLLECTION]). Bad rows are reported and skipped.")
    i.add_argument("catalog", type=Path)
    i.add_argument("--out", type=_location, required=True, metavar="INDEX",
                   help="index directory, or a Milvus collection: milvus:URI[#COLLECTION] (a server, "
                        "milvus:http://host:19530, or a Milvus Lite file, milvus:items.db)")
    i.add_argument("--factory", default="Flat",
                   help="any FAISS index_factory string: Flat, HNSW32, IVF256,Flat, IVF4096,PQ32 ... "
                        "(default: Flat); for a Milvus collection Flat (exact) or milvus:INDEX_TYPE, "
                        "e.g. milvus:HNSW")
    mode = i.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an interrupted ingest into OUT")
    mode.add_argument("--add", action="store_true", help="add new items to the existing index OUT")
    i.add_argument("--nprobe", type=int, help="IVF lists probed per search (saved with the index)")
    i.add_argument("--ef-search", type=int, help="HNSW efSearch (saved with the index)")
    i.add_argument("--photo-views", type=int, metavar="N",
                   help="average the photo embeddings of N re-shots of each item's photo (new backdrop, "
                        "framing, light) into its photo-side vector, by which photo queries are ranked: "
                        "they find their product more often, for N more image-encoder passes per item "
                        "(0 to 16; default: an existing index's setting, else 0; make demo uses 3)")
    i.add_argument("--alt-titles", action=argparse.BooleanOptionalAction, default=None,
                   help="mix each item's other titles (its alt_titles field: the title in another language, "
                        "another wording), each embedded as a text query, into its vector: text and "
                        "photo+text queries meet every name of the product, for one text-encoder pass per "
                        "title (default: an existing index's setting, else off; make demo turns it on)")
    i.add_argument("--gpu", action="store_true", help="build on the GPU (needs faiss-gpu and a GPU)")
    i.add_argument("--chunk-size", type=int, default=256, help="rows per save-able chunk (default: 256)")
    i.add_argument("--request-rows", type=int, default=8,
                   help="rows per request to the item ensemble (default: 8; the server's dynamic "
                        "batcher merges them)")
    i.add_argument("--in-flight", type=int, default=4,
                   help="requests kept in flight, across chunk ends (default: 4, the best measured "
                        "on 2 CPU cores: benchmarks/results/ingest_stream.md; raise it for a GPU server "
                        "or several model instances)")
    i.add_argument("--retries", type=int, default=8,
                   help="re-sends after UNAVAILABLE, e.g. while a server restarts (default: 8)")
    url_arg(i)
    i.set_defaults(func=bind(cmd_index))

    s = sub.add_parser("search", help="search an index by text, photo or both",
                       description="Embed the query through the matching ensemble (query_text, "
                                   "query_image or query_text_image) and return the top-k products.")
    s.add_argument("--index", type=_location, required=True, metavar="INDEX",
                   help="index directory or milvus:URI[#COLLECTION]")
    s.add_argument("--text", help="query text, e.g. 'blue down jacket' or '蓝色羽绒服'")
    s.add_argument("--image", type=Path, help="query photo (JPEG/PNG/WebP)")
    s.add_argument("-k", type=int, default=10, help="number of results (default: 10)")
    s.add_argument("--filter", action="append", metavar="FIELD=VALUE",
                   help="attribute filter; repeat to AND fields / OR values of one field")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.add_argument("--sheet", type=Path, metavar="PNG",
                   help="also draw the query and the results' catalogue photos as a contact sheet")
    url_arg(s)
    s.set_defaults(func=bind(cmd_search))

    d = sub.add_parser("delete", help="delete items from an index by id")
    d.add_argument("--index", type=_location, required=True, metavar="INDEX",
                   help="index directory or milvus:URI[#COLLECTION]")
    d.add_argument("ids", nargs="+")
    d.add_argument("--missing-ok", action="store_true", help="ignore ids the index does not hold")
    d.set_defaults(func=bind(cmd_delete))

    e = sub.add_parser("eval", help="Recall@k / MRR / nDCG@10 of a query set through the server",
                       description="Run a graded query set (queries.jsonl) through the served ensembles "
                                   "and the index; print metrics per query kind, optionally next to "
                                   "the raw-encoder baselines.")
    e.add_argument("--index", type=_location, required=True, metavar="INDEX",
                   help="index directory or milvus:URI[#COLLECTION]")
    e.add_argument("--queries", type=Path, required=True)
    e.add_argument("--json", type=Path, help="also write the metrics as JSON here")
    e.add_argument("--plot", type=Path, metavar="PNG",
                   help="also draw the metrics per query kind as bars (with the baselines when asked for)")
    e.add_argument("--per-query", type=Path, metavar="JSONL",
                   help="also write each query's metrics and ranked results (id, grade, score, title, and "
                        "the attributes asked for that a miss lacks) as JSON lines here, the worst nDCG@10 first")
    e.add_argument("--baselines", action="store_true",
                   help="also evaluate the raw text and image encoders in-process")
    e.add_argument("--catalog", type=Path, help="catalogue for --baselines (default: beside the queries)")
    e.add_argument("--text-model", default=DEFAULT_TEXT_MODEL)
    e.add_argument("--image-model", default=DEFAULT_IMAGE_MODEL)
    url_arg(e)
    e.set_defaults(func=bind(cmd_eval))
