"""config.pbtxt generation through Triton's own protobuf schema, and its checks.

Configs are built as ``model_config_pb2.ModelConfig`` messages (the schema tritonclient
ships) and printed with ``text_format``: a misspelt field is an AttributeError here, not
a model that silently fails to load on the server.  ``check_repository`` re-reads every
config and verifies the ensemble wiring (each consumed tensor is produced, with the
same dtype and dims).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from xmsearch import spec as S
from xmsearch.errors import ConfigError

TARGETS = ("cpu", "onnxruntime", "tensorrt")
NEURAL = (S.TEXT_ENCODER, S.IMAGE_ENCODER, S.FUSION_TEXT, S.FUSION_IMAGE, S.FUSION_JOINT, S.FUSION_ITEM)

# TargetSettings.ort_spinning -> the members' ONNX Runtime switches (allow_spinning,
# force_spinning_stop, spin_max_rows): OnnxModel hands the first two to
# session.intra_op.allow_spinning and session.force_spinning_stop, and runs batches of at most
# spin_max_rows rows in a second session that spins inside its runs ("single": a lone query).
ORT_SPINNING = {"off": ("0", "0", "0"), "run": ("1", "1", "0"), "always": ("1", "0", "0"),
                "single": ("0", "0", "1")}
# The members that get spin_max_rows: the encoders.  With the fusion members' one-row sessions
# left out, query_text p50 0.84x, every other figure the same, server memory 0.91x
# (serving_ab_single.md, third run); in process, spinning made the text-only and photo-only
# fusion graphs slower on a lone row, not faster.
SPIN_LONE_MEMBERS = (S.TEXT_ENCODER, S.IMAGE_ENCODER)

_DTYPES = {"TYPE_INT64": mc.TYPE_INT64, "TYPE_FP32": mc.TYPE_FP32, "TYPE_FP16": mc.TYPE_FP16,
           "TYPE_UINT8": mc.TYPE_UINT8,
           "TYPE_STRING": mc.TYPE_STRING, "TYPE_BOOL": mc.TYPE_BOOL}


@dataclass(frozen=True)
class TargetSettings:
    """Instance counts and threads per target (CPU values tuned for 2 cores)."""

    target: str
    device: str = "auto"  # for onnxruntime: "gpu" or "cpu"; "auto" = gpu
    ort_threads: int = 2
    trt_accelerator: bool = False  # onnxruntime target: TensorRT execution provider
    # ONNX Runtime thread spinning in the cpu target's members (ORT_SPINNING).  Idle pools
    # spinning on 2 cores took the CPU from the member doing work ("always": 0.53x-0.66x the
    # throughput of "off"), and spinning inside every run ("run") lowers p50 at concurrency 1
    # but under load the members spin against each other (text queries/s at 16 0.83x-0.90x,
    # ingest 0.91x).  "single" spins inside runs of one row only, in a second session of each
    # encoder sharing its large weights (SPIN_LONE_MEMBERS): side by side against "off",
    # query_text p50 at concurrency 1 0.74x, query_image p50 0.87x, text and photo queries/s at
    # 16 1.04x / 1.01x, ingest 0.98x (ranges overlapping), server memory 1.06x with MiniLM
    # (serving_ab_single.md, fourth run).
    ort_spinning: str = "single"
    # max_queue_delay_microseconds of every member; None: 0 where the members run on CPU
    # (waiting to form a batch only added latency there, throughput unchanged: serving_ab.md),
    # the spec's batch-forming delay on GPU.
    queue_delay_us: int | None = None
    # (instances, intra-op threads) of the cpu target's text encoder (`xmsearch export
    # --text-encoder-layout`); None: two instances of half ``ort_threads`` each (2x1 on 2 cores).
    # The text encoder also answers ``query_text`` in one step there (S.ensemble_specs), so
    # the clients' next queries reach it the moment it answers; with one instance, tritonserver
    # 2.51's dynamic batcher then often misses its wake-up and leaves them queued for its
    # 500 ms idle wait (benchmarks/results/query_text_one_step.md).  A second instance is
    # idle when they arrive, which wakes it.  Three steps with 2x1 against 1x2 on an AMD EPYC:
    # query_text p50 1.18x, infer/s at concurrency 16 0.96x, ingest 0.93x
    # (benchmarks/results/serving_ab_text_layout_amd.md).
    text_encoder_layout: tuple[int, int] | None = None
    # The same for the image encoder (`xmsearch export --image-encoder-layout`).  Two
    # single-threaded instances, side by side on an AMD EPYC with the defaults below: ingest
    # 1.21x the items/s, photo queries/s at concurrency 16 1.09x, photo p50 at concurrency 1 the
    # same (its one-row session on ort_threads threads; 1.45x on one thread), server memory 1.34x
    # (benchmarks/results/serving_ab_image_lone_threads.md); the ingest ratio of issue #6 moves
    # 1.09x only, as the encoder's own best rate rises with it: for bulk indexing, not the
    # default (memory).
    image_encoder_layout: tuple[int, int] | None = None
    # max_rows_per_run of the cpu target's image encoder: a merged batch of more rows runs as
    # several ONNX Runtime runs of at most this many (0: one run).  ONNX Runtime's arena keeps
    # the largest run's activations; side by side against one run of up to 32 rows, 8 rows held
    # 0.89x the server memory (about 140 MB less) and ingested 1.09x the items/s (ranges apart),
    # every other figure within the spread; 4 rows 0.80x the memory, ingest 1.06x (ranges
    # overlapping) (benchmarks/results/serving_ab_run_rows.md).
    image_encoder_run_rows: int = 8

    def __post_init__(self) -> None:
        if self.ort_spinning not in ORT_SPINNING:
            raise ConfigError(f"ort_spinning must be one of {', '.join(ORT_SPINNING)}, got {self.ort_spinning!r}")
        if not isinstance(self.image_encoder_run_rows, int) or self.image_encoder_run_rows < 0:
            raise ConfigError(f"image_encoder_run_rows must be a row count (0 or more), got {self.image_encoder_run_rows!r}")

    @property
    def text_queries(self) -> bool:
        """Whether the text encoder member answers query text itself (``S.served_member_specs``):
        on the cpu target, where it is a python-backend model that can tokenize."""
        return self.target == "cpu"

    @property
    def on_gpu(self) -> bool:
        return self.target == "tensorrt" or (self.target == "onnxruntime" and self.device != "cpu")

    def queue_delay(self, spec: S.ModelSpec) -> int:
        if self.queue_delay_us is not None:
            return self.queue_delay_us
        return spec.max_queue_delay_us if self.on_gpu else 0

    def layout(self, model: str) -> tuple[int, int] | None:
        """(instances, ONNX Runtime threads) chosen for an encoder on the cpu target, else None."""
        if self.target != "cpu":
            return None
        if model == S.TEXT_ENCODER and self.text_encoder_layout is None:
            return 2, max(1, self.ort_threads // 2)
        return {S.TEXT_ENCODER: self.text_encoder_layout, S.IMAGE_ENCODER: self.image_encoder_layout}.get(model)

    def instances(self, model: str) -> tuple[int, int]:
        """(count, kind) of the instance group for a member."""
        if model in NEURAL:
            if layout := self.layout(model):
                return layout[0], mc.ModelInstanceGroup.KIND_CPU
            return 1, (mc.ModelInstanceGroup.KIND_GPU if self.on_gpu else mc.ModelInstanceGroup.KIND_CPU)
        # Python preprocessing holds the GIL per stub: two stubs decode images in parallel
        # (photo queries, and catalogue ingestion, where decoding is the bulk of the work).
        # Side by side against one each: ingest 1.15x the items/s, photo queries/s at 16 1.04x
        # (benchmarks/results/serving_ab_preprocess_instances.md).
        count = 2 if model in (S.IMAGE_PREPROCESS, S.ITEM_PREPROCESS) else 1
        return count, mc.ModelInstanceGroup.KIND_CPU


def _io(t: S.TensorSpec, cls):
    m = cls(name=t.name, data_type=_DTYPES[t.triton_dtype], dims=list(t.dims))
    if t.optional:
        m.optional = True
    return m


def _param(cfg: mc.ModelConfig, key: str, value: str) -> None:
    cfg.parameters[key].string_value = value


def member_config(spec: S.ModelSpec, settings: TargetSettings, extra_params: dict[str, str] | None = None
                  ) -> mc.ModelConfig:
    """The config of one member model for a target."""
    cfg = mc.ModelConfig(name=spec.name, max_batch_size=spec.max_batch_size)
    cfg.input.extend(_io(t, mc.ModelInput) for t in spec.inputs)
    cfg.output.extend(_io(t, mc.ModelOutput) for t in spec.outputs)
    neural = spec.name in NEURAL
    if not neural or settings.target == "cpu":
        cfg.backend = "python"
        if neural:
            layout = settings.layout(spec.name)
            _param(cfg, "intra_op_threads", str(layout[1] if layout else settings.ort_threads))
            allow, stop, rows = ORT_SPINNING[settings.ort_spinning]
            _param(cfg, "allow_spinning", allow)
            _param(cfg, "force_spinning_stop", stop)
            lone = spec.name in SPIN_LONE_MEMBERS and rows != "0"
            _param(cfg, "spin_max_rows", rows if lone else "0")
            # A lone query runs on every core the target has, also when the member's batches
            # run on instances of fewer threads (an encoder layout such as 2x1).
            _param(cfg, "spin_intra_op_threads", str(settings.ort_threads) if lone else "0")
            run_rows = settings.image_encoder_run_rows if spec.name == S.IMAGE_ENCODER else 0
            _param(cfg, "max_rows_per_run", str(run_rows))
    elif settings.target == "onnxruntime":
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = "model.onnx"
        if settings.trt_accelerator and settings.device != "cpu":
            acc = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            acc.parameters["precision_mode"] = "FP16"
            acc.parameters["max_workspace_size_bytes"] = str(1 << 30)
        if settings.device == "cpu":
            _param(cfg, "intra_op_thread_count", str(settings.ort_threads))
    else:
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = "model.plan"
    db = cfg.dynamic_batching
    db.preferred_batch_size.extend(spec.preferred_batch_sizes)
    db.max_queue_delay_microseconds = settings.queue_delay(spec)
    # Bounded queue: under overload, fail fast with UNAVAILABLE instead of growing latency.
    db.default_queue_policy.max_queue_size = 1024
    count, kind = settings.instances(spec.name)
    cfg.instance_group.add(count=count, kind=kind)
    for k, v in (extra_params or {}).items():
        _param(cfg, k, v)
    return cfg


def ensemble_config(ens: S.EnsembleSpec, members: dict[str, S.ModelSpec],
                    params: dict[str, str]) -> mc.ModelConfig:
    """An ensemble wiring members by tensor name; ``params`` carries the fingerprint."""
    cfg = mc.ModelConfig(name=ens.name, platform="ensemble", max_batch_size=ens.max_batch_size)
    for name in ens.inputs:
        producer = next(members[s.model] for s in ens.steps if name in s.input_map.values())
        t = next(t for t in producer.inputs if t.name == name)
        cfg.input.append(_io(replace(t, optional=False), mc.ModelInput))  # the ensemble needs it
    # The last step's outputs that it hands on under their own name (a member may have more).
    last = ens.steps[-1]
    cfg.output.extend(_io(t, mc.ModelOutput) for t in members[last.model].outputs
                      if last.output_map.get(t.name) == t.name)
    for step in ens.steps:
        st = cfg.ensemble_scheduling.step.add(model_name=step.model, model_version=-1)
        for k, v in step.input_map.items():
            st.input_map[k] = v
        for k, v in step.output_map.items():
            st.output_map[k] = v
    for k, v in params.items():
        _param(cfg, k, v)
    return cfg


def repository_configs(dims: S.Dims, settings: TargetSettings, fingerprint: str
                       ) -> dict[str, mc.ModelConfig]:
    """Every config of a repository: the eight members and the four ensembles."""
    if settings.target not in TARGETS:
        raise ConfigError(f"unknown target {settings.target!r}: choose one of {', '.join(TARGETS)}")
    members = S.served_member_specs(dims, settings.text_queries)
    roles = {name: {"role": role} for name, role in S.TEXT_ROLES.items()}
    if settings.text_queries:
        roles[S.TEXT_ENCODER] = {"role": "query"}  # of the TEXT it reads
    configs = {name: member_config(sp, settings, roles.get(name)) for name, sp in members.items()}
    params = {S.FINGERPRINT_PARAMETER: fingerprint, S.EMBED_DIM_PARAMETER: str(dims.embed_dim)}
    for name, ens in S.ensemble_specs(settings.text_queries).items():
        configs[name] = ensemble_config(ens, members, params)
    check_configs(configs)
    return configs


def to_text(cfg: mc.ModelConfig) -> str:
    return text_format.MessageToString(cfg)


def write_config(cfg: mc.ModelConfig, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.pbtxt"
    path.write_text(to_text(cfg))
    return path


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a config.pbtxt with Triton's schema (raises ConfigError naming the file)."""
    try:
        return text_format.Parse(Path(path).read_text(), mc.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise ConfigError(f"{path}: not a valid Triton model config: {e}") from e


def read_repository(root: Path) -> dict[str, mc.ModelConfig]:
    configs = {}
    for p in sorted(Path(root).glob("*/config.pbtxt")):
        cfg = read_config(p)
        if cfg.name != p.parent.name:
            raise ConfigError(f"{p}: model name {cfg.name!r} differs from its folder {p.parent.name!r}")
        configs[cfg.name] = cfg
    return configs


def check_configs(configs: dict[str, mc.ModelConfig]) -> None:
    """Verify each ensemble's wiring: consumed tensors are produced with equal dtype/dims."""
    for cfg in configs.values():
        if cfg.platform != "ensemble":
            continue
        where = f"ensemble {cfg.name!r}"
        available = {i.name: (i.data_type, list(i.dims)) for i in cfg.input}
        for step in cfg.ensemble_scheduling.step:
            member = configs.get(step.model_name)
            if member is None:
                raise ConfigError(f"{where}: step model {step.model_name!r} is not in the repository")
            if member.max_batch_size < cfg.max_batch_size:
                raise ConfigError(f"{where}: max_batch_size {cfg.max_batch_size} exceeds "
                                  f"{member.name}'s {member.max_batch_size}")
            m_in = {i.name: i for i in member.input}
            for m_name, e_name in step.input_map.items():
                if m_name not in m_in:
                    raise ConfigError(f"{where}: {member.name} has no input {m_name!r}")
                if e_name not in available:
                    raise ConfigError(f"{where}: tensor {e_name!r} feeding {member.name}.{m_name} "
                                      "is produced by no earlier step")
                got = available[e_name]
                want = (m_in[m_name].data_type, list(m_in[m_name].dims))
                if got != want:
                    raise ConfigError(f"{where}: {e_name!r} is {got}, {member.name}.{m_name} wants {want}")
            missing = [n for n, i in m_in.items() if n not in step.input_map and not i.optional]
            if missing:
                raise ConfigError(f"{where}: {member.name} inputs {missing} are not wired")
            m_out = {o.name: o for o in member.output}
            for m_name, e_name in step.output_map.items():
                if m_name not in m_out:
                    raise ConfigError(f"{where}: {member.name} has no output {m_name!r}")
                available[e_name] = (m_out[m_name].data_type, list(m_out[m_name].dims))
        for o in cfg.output:
            if available.get(o.name) != (o.data_type, list(o.dims)):
                raise ConfigError(f"{where}: output {o.name!r} is not produced as declared")
