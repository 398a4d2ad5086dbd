"""``xmsearch``: the command line, a thin layer over the library.

Every subcommand parses its arguments, calls one library function and prints the result.
Errors the user can fix (XmsearchError) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from xmsearch.errors import InputError, XmsearchError

DEFAULT_URL = "localhost:8001"
DEFAULT_REPOSITORY = Path("model_repository")


def _progress_bar(desc: str, total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="it", dynamic_ncols=True, leave=False, file=sys.stderr)


class TrainingProgress:
    """Progress bars of ``train_catalog``, one at a time: each frozen-encoder pass
    (``progress``), then the epochs with loss and held-out recall (``on_epoch``)."""

    def __init__(self, epochs: int, started: float | None = None):
        self.epochs = epochs
        self.key: tuple | None = None  # what the open bar shows
        self.bar = None
        # A bar opens at its stage's first report, one batch or epoch in; the stage began at
        # the report before it (or at the start), so its rate counts from there.
        self.last_report = time.time() if started is None else started

    def _switch(self, key: tuple, desc: str, total: int):
        if key != self.key:
            self.close()
            self.key, self.bar = key, _progress_bar(desc, total)
            self.bar.start_t = self.bar.last_print_t = self.last_report
        return self.bar

    def progress(self, label: str, done: int, total: int) -> None:
        bar = self._switch(("encoding", label), f"encoding {label}", total)
        bar.n = done
        bar.refresh()
        self.last_report = time.time()

    def on_epoch(self, rec: dict) -> None:
        bar = self._switch(("training",), "training", self.epochs)
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", img_r1=f"{rec['val_image_r1']:.2f}",
                        txt_r10=f"{rec['val_text_r10']:.2f}")
        self.last_report = time.time()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.key = self.bar = None


# ----------------------------------------------------------------------- arguments


def _model_args(p: argparse.ArgumentParser) -> None:
    from xmsearch.spec import DEFAULT_IMAGE_MODEL, DEFAULT_TEXT_MODEL, IMAGE_MODELS

    g = p.add_argument_group("models")
    g.add_argument("--text-model", default=DEFAULT_TEXT_MODEL, metavar="NAME_OR_PATH",
                   help="text encoder: minilm-l6 (offline, English), multilingual-e5-small-q4 "
                        "(offline, Chinese+English), a Hugging Face name or a local folder "
                        f"(default: {DEFAULT_TEXT_MODEL})")
    g.add_argument("--image-model", default=DEFAULT_IMAGE_MODEL, choices=IMAGE_MODELS,
                   help=f"image encoder (default: {DEFAULT_IMAGE_MODEL})")
    g.add_argument("--image-checkpoint", type=Path, metavar="PATH",
                   help="torchvision state_dict for resnet* image models")


def _url_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--url", default=DEFAULT_URL, metavar="HOST:PORT",
                   help=f"Triton gRPC endpoint (default: {DEFAULT_URL})")
    g.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="per-request timeout (default: 60)")


# ----------------------------------------------------------------------- commands


def instances_by_threads(text: str) -> tuple[int, int]:
    """``"2x1"`` -> (2 instances, 1 thread each): the argparse type of --text-encoder-layout and --image-encoder-layout."""
    try:
        n, t = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected INSTANCESxTHREADS, e.g. 2x1") from None
    if not (1 <= n <= 16 and 1 <= t <= 64):
        raise argparse.ArgumentTypeError(f"{text!r}: instances must be 1-16 and threads 1-64")
    return n, t


def cmd_export(a: argparse.Namespace) -> int:
    from xmsearch.export.pipeline import export_repository
    from xmsearch.export.repository import TargetSettings

    if a.queue_delay_us is not None and a.queue_delay_us < 0:
        raise InputError(f"--queue-delay-us must be 0 or more, got {a.queue_delay_us}")
    for flag, value in (("--text-encoder-layout", a.text_encoder_layout),
                        ("--image-encoder-layout", a.image_encoder_layout)):
        if value is not None and a.target != "cpu":
            raise InputError(f"{flag} is for the cpu target, not {a.target}")
    if a.ort_spinning is not None and a.target != "cpu":
        raise InputError(f"--ort-spinning is for the cpu target, not {a.target}")
    spinning = {"ort_spinning": a.ort_spinning} if a.ort_spinning else {}
    settings = TargetSettings(a.target, device=a.device, ort_threads=a.ort_threads,
                              trt_accelerator=a.trt_accelerator, queue_delay_us=a.queue_delay_us,
                              text_encoder_layout=a.text_encoder_layout,
                              image_encoder_layout=a.image_encoder_layout, **spinning)
    t0 = time.time()
    res = export_repository(a.out, a.target, a.fusion, a.untrained, a.text_model, a.image_model,
                            a.image_checkpoint, settings, a.precision, text_precision=a.text_precision,
                            fusion_precision=a.fusion_precision, step=lambda m: print(m, flush=True))
    print(f"wrote {a.target} repository {res.out} (fingerprint {res.fingerprint}, text encoder "
          f"{res.text_precision}, fusion {res.fusion_precision}"
          f"{', UNTRAINED fusion' if not res.trained else ''}) in {time.time() - t0:.1f}s")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from xmsearch import server
    from xmsearch.errors import ServerError

    if a.pid_file:
        # Background mode: no die_with_parent, so tritonserver outlives this process; the
        # pid file names tritonserver itself, which `xmsearch stop` signals directly.
        srv = server.TritonServer(a.repository, grpc_port=a.grpc_port, http_port=a.http_port,
                                  metrics_port=a.metrics_port, log_file=a.log_file)
        srv.start(timeout=a.ready_timeout)
        try:
            server.write_pid_file(a.pid_file, srv.pid)
        except OSError as e:
            srv.stop()  # a server nobody can find to stop is worse than none
            raise ServerError(f"cannot write pid file {a.pid_file} ({e}); server stopped") from e
        _print_ready(srv.info())
        return 0

    # Foreground: serve_forever stops the server on Ctrl-C *and* SIGTERM, ties its life to
    # this process (die_with_parent) and raises when tritonserver exits on its own.
    def on_ready(info: server.ServerInfo) -> None:
        _print_ready(info)
        print("press Ctrl-C to stop", flush=True)

    server.serve_forever(a.repository, a.grpc_port, a.http_port, a.metrics_port,
                         log_file=a.log_file, ready_timeout=a.ready_timeout, on_ready=on_ready)
    return 0


def _print_ready(info) -> None:
    print(f"tritonserver ready (pid {info.pid}): gRPC {info.grpc_url}, HTTP {info.http_url}, "
          f"metrics {info.metrics_url}; models: {', '.join(info.models)}", flush=True)


def cmd_stop(a: argparse.Namespace) -> int:
    from xmsearch import server

    stopped = server.stop_from_pid_file(a.pid_file)
    print("stopped tritonserver" if stopped else f"no server running for {a.pid_file}")
    return 0


def cmd_demo_catalog(a: argparse.Namespace) -> int:
    from xmsearch.demo import generate_demo_catalog

    summary = generate_demo_catalog(a.out, n=a.n, seed=a.seed, n_queries=a.queries, progress=True,
                                    first_query=a.first_query)
    print(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from xmsearch.train import TrainConfig, train_catalog

    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, weight_decay=a.weight_decay,
                      seed=a.seed, val_fraction=a.val_fraction, group_size=a.group_size,
                      edit_positives=a.edit_positives, view_positives=a.view_positives,
                      item_mix=a.item_mix, precision=a.precision)
    bars = TrainingProgress(cfg.epochs)
    try:
        res = train_catalog(a.catalog, a.out, a.text_model, a.image_model, cfg, progress=bars.progress,
                            on_epoch=bars.on_epoch, image_checkpoint=a.image_checkpoint)
    finally:
        bars.close()
    last = res.history[-1]
    print(f"trained fusion on {res.checkpoint.meta['items']} items in {res.seconds:.1f}s "
          f"({res.checkpoint.meta['precision']}): "
          f"loss {res.history[0]['loss']:.3f} -> {last['loss']:.3f}, held-out photo R@1 "
          f"{last['val_image_r1']:.3f}, title R@10 {last['val_text_r10']:.3f}; saved {a.out}")
    if not a.no_plot:
        from xmsearch.plots import training_curves, training_plot_path

        plot = training_curves(res.history, a.plot or training_plot_path(a.out), title=f"fusion training: {a.out.name}")
        print(f"training curves: {plot}")
    return 0


# ------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from xmsearch import server
    from xmsearch.export.quantize import PRECISIONS

    p = argparse.ArgumentParser(
        prog="xmsearch",
        description="Cross-modal product search: export models to Triton, serve them, index a "
                    "catalogue into FAISS and search it by text, photo or both.")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("export", help="export encoders + fusion into a Triton model repository",
                       description="Export the text encoder, image encoder and fusion module to ONNX "
                                   "(checked against PyTorch) and write a Triton model repository with "
                                   "ensembles query_text, query_image, query_text_image and item.")
    e.add_argument("--target", choices=("cpu", "onnxruntime", "tensorrt"), default="cpu",
                   help="cpu: python backend running ONNX Runtime (works with the bundled server); "
                        "onnxruntime: native onnxruntime backend (NGC container); tensorrt: TensorRT "
                        "engines (needs a GPU with TensorRT). Default: cpu")
    w = e.add_mutually_exclusive_group(required=True)
    w.add_argument("--fusion", type=Path, metavar="CKPT", help="trained fusion checkpoint (xmsearch train)")
    w.add_argument("--untrained", action="store_true",
                   help="random fusion weights: for plumbing tests only, the vectors mean nothing")
    e.add_argument("--out", type=Path, default=DEFAULT_REPOSITORY, help="repository folder (default: model_repository)")
    e.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp16",
                   help="tensorrt target precision (default: fp16)")
    e.add_argument("--text-precision", choices=PRECISIONS, default="auto",
                   help="served text encoder graph: int8 = dynamic ONNX Runtime quantization of its "
                        "MatMul weights, CPU only, about 2x faster per title with the demo's "
                        "retrieval figures unchanged (benchmarks/results/text_int8.md); auto = int8 "
                        "where the text encoder runs on ONNX Runtime's CPU provider of a CPU with int8 "
                        "dot products (VNNI / AMX / ARM64), else fp32 (default: auto)")
    e.add_argument("--fusion-precision", choices=PRECISIONS, default="auto",
                   help="served fusion graphs, the same choice: int8 runs their weight products on int8 "
                        "(fusion_item about 0.6x the time per item; fused vectors at cosine >= 0.9997 "
                        "to fp32 on the demo, the export refuses below 0.995: "
                        "benchmarks/results/fusion_int8.md); auto = int8 on the same CPUs (default: auto)")
    e.add_argument("--text-encoder-layout", type=instances_by_threads, metavar="NxT",
                   help="cpu target: serve the text encoder as N instances of T ONNX Runtime threads "
                        "(default: 2 instances of half --ort-threads). It answers query_text in one "
                        "step there; with one instance, clients' next queries often wait out "
                        "tritonserver's 500 ms batcher idle wait (benchmarks/results/query_text_one_step.md)")
    e.add_argument("--image-encoder-layout", type=instances_by_threads, metavar="NxT",
                   help="cpu target: serve the image encoder as N instances of T ONNX Runtime threads "
                        "(default: one instance of --ort-threads). 2x1 indexed 1.21x the items/s on 2 "
                        "cores, a single photo query as fast (it still runs on --ort-threads threads), "
                        "for 1.34x the server memory: for bulk indexing")
    e.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                   help="onnxruntime target instance kind (default: gpu)")
    e.add_argument("--ort-threads", type=int, default=2, help="ONNX Runtime intra-op threads per instance")
    e.add_argument("--ort-spinning", choices=("single", "off", "run", "always"),
                   help="cpu target: ONNX Runtime worker threads busy-wait inside runs of a single row "
                        "only, in a second session of each encoder that shares its large weights "
                        "(single, the default: a lone text query's latency 0.74x of off's, the same "
                        "throughput under load, about 70 MB more memory), never (off), inside every "
                        "run (run: about 10%% less throughput under load on 2 cores), or also when "
                        "idle (always: ONNX Runtime's default, which starves the other members)")
    e.add_argument("--queue-delay-us", type=int, metavar="US",
                   help="dynamic-batching max_queue_delay_microseconds of every member (default: 0 "
                        "when the members run on CPU, a per-member batch-forming delay on GPU)")
    e.add_argument("--trt-accelerator", action="store_true",
                   help="onnxruntime target: enable the TensorRT execution provider")
    _model_args(e)
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="run tritonserver on a model repository",
                       description="Start the tritonserver bundled with nvidia-pytriton on a repository, "
                                   "wait until every model is ready and say where it listens.")
    s.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY,
                   help="model repository written by `xmsearch export` (default: model_repository)")
    s.add_argument("--grpc-port", type=int, default=server.DEFAULT_GRPC_PORT,
                   help=f"gRPC port (default: {server.DEFAULT_GRPC_PORT})")
    s.add_argument("--http-port", type=int, default=server.DEFAULT_HTTP_PORT,
                   help=f"HTTP port: health at /v2/health/ready (default: {server.DEFAULT_HTTP_PORT})")
    s.add_argument("--metrics-port", type=int, default=server.DEFAULT_METRICS_PORT,
                   help=f"Prometheus metrics port (default: {server.DEFAULT_METRICS_PORT})")
    s.add_argument("--log-file", type=Path, help="write the server log here (default: a temp file)")
    s.add_argument("--pid-file", type=Path,
                   help="start in the background, write the pid here and return (make serve)")
    s.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    s.set_defaults(func=cmd_serve)

    st = sub.add_parser("stop", help="stop a background server started with serve --pid-file")
    st.add_argument("--pid-file", type=Path, required=True,
                    help="the pid file given to `xmsearch serve --pid-file`")
    st.set_defaults(func=cmd_stop)

    d = sub.add_parser("demo-catalog", help="generate the demo catalogue and its query set",
                       description="Render a reproducible product catalogue (photos, English and Chinese "
                                   "titles, attributes) and a graded query set; nothing is downloaded.")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--n", type=int, default=1500, help="number of products (default: 1500)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--queries", type=int, default=300, help="number of queries (default: 300)")
    d.add_argument("--first-query", type=int, default=0, metavar="K",
                   help="start at query K: with K >= the evaluation run's --queries, a disjoint "
                        "development set of the same catalogue, to choose settings on (default: 0)")
    d.set_defaults(func=cmd_demo_catalog)

    t = sub.add_parser("train", help="train the fusion module on a catalogue",
                       description="Contrastive (symmetric InfoNCE) training of the fusion module on the "
                                   "catalogue's own title/photo pairs; encoders frozen, features cached.")
    t.add_argument("catalog", type=Path, help="catalogue JSONL/CSV (id, title, image, ...)")
    t.add_argument("--out", type=Path, required=True, metavar="CKPT")
    # The defaults are TrainConfig's (tests/test_train.py holds them equal; importing
    # xmsearch.train here would load torch for every subcommand's --help).
    t.add_argument("--epochs", type=int, default=40, help="passes over the catalogue (default 40)")
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (default 0.05)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the items whose last photo re-shot and query-worded title are kept out of "
                        "training, for the validation recall per epoch (the items themselves are trained; "
                        "default 0.05)")
    t.add_argument("--group-size", type=int, default=4,
                   help="look-alike items per group in the extra photo batches that teach the photo path "
                        "to tell near-duplicates apart (1: off; default 4)")
    t.add_argument("--edit-positives", type=int, default=4, metavar="K",
                   help="an edit view (an item's words over another item's photo) also counts its target's "
                        "K nearest items as answers, by the item embeddings of the epoch before (0: only "
                        "the target; default 4)")
    t.add_argument("--view-positives", action=argparse.BooleanOptionalAction, default=True,
                   help="the text+photo views (an item's words over a re-shot of its photo) also count the "
                        "K nearest items of --edit-positives as answers (default: on; "
                        "--no-view-positives trains as training recipe 3 did)")
    t.add_argument("--item-mix", type=float, default=2.0, metavar="M",
                   help="an item's stored vector is its title+photo embedding plus M times the sum of its "
                        "title-only and photo-only embeddings, renormalised (0: the joint one alone; "
                        "photo queries are ranked again by a second vector that does not use it; default 2)")
    t.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="arithmetic of the training steps: bf16 autocast (fp32 weights) or fp32; auto picks "
                        "bf16 where the CPU has native bfloat16 (AVX512-BF16/AMX): 1.6x faster per epoch on the demo "
                        "(benchmarks/results/train_precision.md) "
                        "(default auto)")
    plot = t.add_mutually_exclusive_group()
    plot.add_argument("--plot", type=Path, metavar="PNG",
                      help="where to draw the loss and validation recall per epoch (default: beside the "
                           "checkpoint, CKPT_STEM.training.png)")
    plot.add_argument("--no-plot", action="store_true", help="draw no training curves")
    _model_args(t)
    t.set_defaults(func=cmd_train)

    from xmsearch.client import cli as client_cli  # index, search, delete, eval

    client_cli.add_commands(sub, _url_arg, _progress_bar)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return a.func(a)
    except XmsearchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
