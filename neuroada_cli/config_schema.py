"""The run config's schema: one dataclass per section, key listings, and the checks of every value.

``config.validate`` checks a composed config against these dataclasses (unknown keys are errors) and
then ``check_values``; the YAML files in configs/ give the values, these classes only say which keys
exist. Allowed values come from their owners (methods, task kinds, the method library, eval, models,
the training plumbing), imported inside ``check_values`` so that this module needs no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import TYPE_CHECKING, Any, List, Optional

from .errors import UserError

if TYPE_CHECKING:
    from omegaconf import DictConfig

# Keys that were removed: an old config using one gets this one-line fix instead of "unknown key".
REPLACED_KEYS = {
    "trainer.tensorboard": "trainer.tensorboard was replaced; use trainer.report_to=[tensorboard]",
    "trainer.select_best": "trainer.select_best was replaced by trainer.validate (on by default: the best "
                           "evaluation is kept as adapter/); remove the key, or set trainer.validate=false",
}
RESUME_CHOICES = (False, True, "auto")   # trainer.resume
NONFINITE_CHOICES = ("stop", "skip")     # trainer.nonfinite
LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------- schema
@dataclass
class ModelSection:
    name_or_path: str = "embedded:smollm2-135m-instruct"
    gguf_file: Optional[str] = None
    dtype: str = "float32"
    family: str = "auto"
    attn_implementation: Optional[str] = None  # null = transformers' default | eager | sdpa | flash_attention_2
    quantization: Optional[str] = None    # null (the dtype above) | nf4 | fp4 | int8: a frozen bitsandbytes base


@dataclass
class NeuroAdaSection:
    """core.config.NeuroAdaConfig's fields with the same defaults (tests/test_config.py checks it, and that
    configs/neuroada/default.yaml gives these values), plus the training-side gradient_batches."""
    k: int = 20
    selection: str = "magnitude"
    target_modules: Any = field(default_factory=lambda: list(LLAMA_PROJECTIONS))  # a list of names, or all-linear
    train_bias: bool = False
    modules_to_save: List[str] = field(default_factory=list)
    impl: str = "fused"
    seed: int = 0
    gradient_batches: int = 4
    scope: str = "neuron"                 # neuron | layer | global (placement ablations)
    neuron_fraction: float = 1.0          # share of rows per layer that get their k cells
    mode: str = "auto"                    # auto | merged (W holds orig + delta) | unmerged (W never written)


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: Any = field(default_factory=lambda: list(LLAMA_PROJECTIONS))  # a list of names, or all-linear
    modules_to_save: Optional[List[str]] = None  # trained fully; null = PEFT's default (the classifier head)


@dataclass
class HeadSection:  # method=head: a linear probe
    modules_to_save: List[str] = field(default_factory=lambda: ["classifier"])  # the modules that train


@dataclass
class TaskSection:
    name: str = "commonsense"
    kind: str = "causal_lm"
    train_dataset: str = "commonsense_15k"
    template: str = "commonsense"
    eval_suite: Optional[str] = "commonsense"
    num_labels: Optional[int] = None      # sequence classification: null = from the GLUE task table
    problem_type: Optional[str] = None    # regression | single_label_classification; null = from the table
    head_dropout: Optional[float] = None  # dropout before the classification head (null = checkpoint's)


@dataclass
class DataSection:
    dir: Optional[str] = None
    train_limit: Optional[int] = None
    max_length: int = 512
    bucket_batches: int = 32
    train_file: Optional[str] = None      # your own data (JSON/JSONL/CSV/Parquet or a hub id); null = task's set
    format: str = "auto"                  # auto | alpaca | prompt_completion | chat | llm_adapters
    train_on_prompt: bool = False         # also supervise prompt / non-assistant tokens
    val_file: Optional[str] = None        # validation data, same formats
    val_fraction: Optional[float] = None  # or hold out this seeded fraction of the training rows
    packing: bool = False                 # concatenate examples into rows of max_length (no cross-attention)


@dataclass
class OptimizerSection:
    name: str = "adamw"
    lr: float = 7e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_ratio: float = 0.06
    scheduler: str = "linear"
    max_grad_norm: Optional[float] = None


@dataclass
class TrainerSection:
    epochs: int = 3
    max_steps: Optional[int] = None
    batch_size: int = 16
    micro_batch_size: int = 4
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    seed: int = 42
    output_dir: str = "outputs"
    resume: Any = False                    # false | true (a checkpoint must exist) | auto (resume if there is one)
    log_every: int = 1
    checkpoint_every: int = 100
    report_to: List[str] = field(default_factory=list)  # tensorboard | wandb | mlflow (through accelerate)
    validate: bool = True                  # evaluate the kind's validation examples (none: no validation)
    eval_every: Optional[int] = None       # optimizer steps between evaluations; null/0 = epoch ends only
    early_stopping_patience: Optional[int] = None  # stop after this many evaluations without improvement
    strategy: str = "ddp"                  # ddp | fsdp (FSDP2 shards; neuroada_cli/strategies/)
    nonfinite: str = "stop"                # a NaN/inf loss or gradient norm: stop | skip (the step)
    nonfinite_patience: int = 3            # skip: stop after this many non-finite steps in a row
    cross_entropy: str = "auto"            # auto | plain | chunked | liger: how the causal-LM loss forms logits


@dataclass
class EvalSection:
    tasks: Optional[List[str]] = None
    limit: Optional[int] = None
    batch_size: int = 16
    scoring: str = "generate"
    max_new_tokens: Optional[int] = None
    commonsense_rule: str = "trigger"
    aqua_rule: str = "authors"
    merge: Optional[bool] = None          # null = auto: merge (fp32) unless model.quantization is set
    after_train: bool = False
    output_dir: Optional[str] = None
    adapter: Optional[str] = None         # set by the CLI: the adapter to evaluate (null = base model)
    run_dir: Optional[str] = None         # set by the CLI for `neuroada eval run=DIR`
    backend: str = "native"               # native (our suites) | lm_eval (lm-evaluation-harness tasks)
    lm_eval_include_path: Optional[str] = None   # lm_eval: a folder of task YAMLs (offline-friendly)
    lm_eval_only_included: bool = False   # lm_eval: index only the include path (skips lm-eval's built-in tasks)
    num_fewshot: Optional[int] = None     # lm_eval: few-shot examples (null = the task's default)


@dataclass
class PreferenceSection:  # task.kind=preference (DPO)
    beta: float = 0.1                     # strength of the pull towards the reference (the frozen base)
    loss: str = "sigmoid"                 # sigmoid (DPO) | ipo
    precompute_ref: bool = False          # reference log-probabilities once per example before training


@dataclass
class RunConfig:
    recipe: Optional[str] = None
    method: str = "neuroada"
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    neuroada: NeuroAdaSection = field(default_factory=NeuroAdaSection)
    lora: LoraSection = field(default_factory=LoraSection)
    head: HeadSection = field(default_factory=HeadSection)
    preference: PreferenceSection = field(default_factory=PreferenceSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)


# ------------------------------------------------------------------------------------ key listings
def schema_keys(schema) -> list[str]:
    return [f.name for f in fields(schema)]


def section_names() -> list[str]:
    """The config's sections (model, task, neuroada, ...), in the schema's order: what `train --help` lists."""
    return [f.name for f in fields(RunConfig) if section_schema(f.name) is not None]


def top_level_values() -> list[str]:
    """The top-level keys that are plain values (recipe, method)."""
    return [f.name for f in fields(RunConfig) if section_schema(f.name) is None]


def section_schema(section: str):
    """The dataclass of a dotted section ('' = top level), or None if there is no such section."""
    schema = RunConfig
    for part in [p for p in section.split(".") if p]:
        match = {f.name: f for f in fields(schema)}.get(part)
        default = match.default_factory() if match is not None and callable(match.default_factory) else None
        if not is_dataclass(default):
            return None
        schema = type(default)
    return schema


def section_keys(section: str) -> list[str]:
    """Valid keys of a config section (``trainer``), or of the top level for ``""``."""
    return schema_keys(section_schema(section) or RunConfig)


def valid_keys_text(section: str) -> str:
    while section and section_schema(section) is None:  # trainer.foo.bar: list what trainer has
        section = section.rpartition(".")[0]
    if not section:
        return f"valid top-level keys: {', '.join(section_keys(''))}"
    return f"valid keys in {section}: {', '.join(section_keys(section))}"


# ------------------------------------------------------------------------------------- unknown keys
def check_unknown_keys(node: Any, schema=None, prefix: str = "") -> None:
    """UserError naming the first key that the schema does not have (recursing into sections)."""
    from omegaconf import DictConfig

    schema = schema or RunConfig
    if not isinstance(node, DictConfig):
        return
    known = {f.name: f for f in fields(schema)}
    for key in node.keys():
        if key not in known:
            name = f"{prefix}{key}"
            if name in REPLACED_KEYS:
                raise UserError(REPLACED_KEYS[name])
            raise UserError(f"unknown key {name!r}; {valid_keys_text(prefix.rstrip('.'))}")
        factory = known[key].default_factory
        default = factory() if callable(factory) else None
        if is_dataclass(default):
            child = node._get_node(key)
            if not isinstance(child, DictConfig):
                raise UserError(f"{prefix}{key} must be a section with keys {', '.join(schema_keys(type(default)))}")
            check_unknown_keys(child, type(default), f"{prefix}{key}.")


# ------------------------------------------------------------------------------------------ values
def accumulation_steps(batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Micro-batches each process accumulates per optimizer step (``batch_size`` is the global batch).

    The one owner of the divisibility check: validation and the training recipe both call it.
    """
    per_step = micro_batch_size * world_size
    _require(
        batch_size >= 1 and micro_batch_size >= 1 and batch_size % per_step == 0,
        f"trainer.batch_size={batch_size} is not divisible by micro_batch_size x processes = "
        f"{micro_batch_size} x {world_size}; pick a batch_size that is a multiple of {per_step}",
    )
    return batch_size // per_step


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def _one_of(value, allowed, key: str) -> None:
    _require(value in allowed, f"{key}={value!r} is not valid; use one of {', '.join(map(str, allowed))}")


def check_values(cfg: DictConfig, world_size: int) -> None:
    """Every value of a typed, resolved config; UserError naming the first bad one and the fix."""
    check_finite(cfg)
    from .data.tokenize import check_max_length
    from .eval.base import SCORINGS
    from .kinds import KIND_NAMES
    from .core.config import IMPLS, SCOPES, SELECTIONS
    from .methods import METHOD_NAMES
    from .methods.targets import check_target_modules
    from .data.formats import FORMATS
    from .models import ATTN_IMPLEMENTATIONS, DTYPES, FAMILIES, QUANTIZATIONS
    from .core.config import MODES
    from .kinds.causal_lm import CROSS_ENTROPY_IMPLS
    from .kinds.preference import PREFERENCE_LOSSES
    from .training.parts import PRECISIONS, TRACKERS
    from .strategies import STRATEGIES

    _one_of(cfg.method, METHOD_NAMES, "method")
    _require(bool(cfg.model.name_or_path), "model.name_or_path is empty; give a hub id, a local dir or embedded:NAME")
    _one_of(cfg.model.dtype, DTYPES, "model.dtype")
    _one_of(cfg.model.family, FAMILIES, "model.family")
    _one_of(cfg.model.attn_implementation, (None,) + ATTN_IMPLEMENTATIONS, "model.attn_implementation")
    _one_of(cfg.model.quantization, (None,) + QUANTIZATIONS, "model.quantization")
    _one_of(cfg.task.kind, KIND_NAMES, "task.kind")
    n = cfg.neuroada
    _require(n.k >= 1, f"neuroada.k={n.k} is invalid; use a whole number >= 1 (the paper uses 1 or 20)")
    _one_of(n.selection, SELECTIONS, "neuroada.selection")
    _one_of(n.impl, IMPLS, "neuroada.impl")
    check_target_modules(n.target_modules, "neuroada.target_modules")
    _require(n.gradient_batches >= 1, f"neuroada.gradient_batches={n.gradient_batches} must be >= 1")
    _one_of(n.scope, SCOPES, "neuroada.scope")
    _one_of(n.mode, MODES, "neuroada.mode")
    _require(cfg.model.quantization is None or n.mode != "merged",
             f"neuroada.mode=merged cannot write into a {cfg.model.quantization} base; use neuroada.mode=auto "
             "(unmerged on a quantized base) or model.quantization=null")
    _require(0 < n.neuron_fraction <= 1, f"neuroada.neuron_fraction={n.neuron_fraction} is invalid; use a number in "
             "(0, 1], e.g. 0.5")
    _require(n.scope == "neuron" or (n.selection != "gradient" and n.neuron_fraction >= 1),
             f"neuroada.scope={n.scope} needs selection magnitude|reverse|random and neuron_fraction=1")
    lo = cfg.lora
    _require(lo.r >= 1, f"lora.r={lo.r} must be >= 1")
    _require(lo.alpha > 0, f"lora.alpha={lo.alpha} must be > 0")
    _require(0 <= lo.dropout < 1, f"lora.dropout={lo.dropout} must be in [0, 1)")
    check_target_modules(lo.target_modules, "lora.target_modules")
    heads = cfg.head.modules_to_save
    _require(bool(heads) and all(isinstance(h, str) and h for h in heads),
             f"head.modules_to_save={list(heads)!r} is not valid; name the modules that train, e.g. [classifier]")
    d = cfg.data
    check_max_length(d.max_length, "data.max_length")
    _require(d.train_limit is None or d.train_limit >= 1, f"data.train_limit={d.train_limit} must be >= 1 or null")
    _require(d.bucket_batches >= 1, f"data.bucket_batches={d.bucket_batches} must be >= 1")
    _check_own_data(d, cfg.task.kind, FORMATS)  # task.kind is known to be valid here
    _check_optimizer(cfg.optimizer)
    t = cfg.trainer
    _one_of(t.precision, PRECISIONS, "trainer.precision")
    # fsdp with one process is refused by strategy.check_strategy when training starts, not here: eval and
    # export validate a run's config (maybe trained with fsdp) as one process.
    _one_of(t.strategy, STRATEGIES, "trainer.strategy")
    _require(t.epochs >= 1, f"trainer.epochs={t.epochs} must be >= 1")
    _require(t.max_steps is None or t.max_steps >= 1, f"trainer.max_steps={t.max_steps} must be >= 1 or null")
    _require(t.micro_batch_size >= 1, f"trainer.micro_batch_size={t.micro_batch_size} must be >= 1")
    accumulation_steps(t.batch_size, t.micro_batch_size, world_size)
    _require(t.log_every >= 1, f"trainer.log_every={t.log_every} must be >= 1")
    _require(t.checkpoint_every >= 0, f"trainer.checkpoint_every={t.checkpoint_every} must be >= 0 (0 = off)")
    _require(bool(t.output_dir), "trainer.output_dir is empty")
    for tracker in t.report_to:
        _one_of(tracker, TRACKERS, "trainer.report_to entry")
    _require(t.eval_every is None or t.eval_every >= 0,
             f"trainer.eval_every={t.eval_every} must be >= 0 or null (0/null = at epoch ends only)")
    _require(t.early_stopping_patience is None or t.early_stopping_patience >= 1,
             f"trainer.early_stopping_patience={t.early_stopping_patience} must be >= 1 or null (off)")
    _require(t.resume in RESUME_CHOICES, f"trainer.resume={t.resume!r} is not valid; use true, false or auto")
    _one_of(t.nonfinite, NONFINITE_CHOICES, "trainer.nonfinite")
    _one_of(t.cross_entropy, CROSS_ENTROPY_IMPLS, "trainer.cross_entropy")
    p = cfg.preference
    _require(p.beta > 0, f"preference.beta={p.beta} must be > 0 (DPO uses 0.1 by default)")
    _one_of(p.loss, PREFERENCE_LOSSES, "preference.loss")
    _require(t.nonfinite_patience >= 1, f"trainer.nonfinite_patience={t.nonfinite_patience} must be >= 1")
    e = cfg.eval
    _one_of(e.scoring, SCORINGS, "eval.scoring")
    from .eval.runner import BACKENDS

    _one_of(e.backend, BACKENDS, "eval.backend")
    _require(e.backend != "lm_eval" or bool(e.tasks), "eval.backend=lm_eval needs eval.tasks=[TASK,...] (lm-eval task names)")
    _require(e.num_fewshot is None or e.num_fewshot >= 0, f"eval.num_fewshot={e.num_fewshot} must be >= 0 or null")
    _require(e.batch_size >= 1, f"eval.batch_size={e.batch_size} must be >= 1")
    _require(e.limit is None or e.limit >= 1, f"eval.limit={e.limit} must be >= 1 or null")


def check_finite(node: Any, prefix: str = "") -> None:
    """Every number must be finite: optimizer.lr=inf or a nan anywhere would train garbage (or nothing)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, (DictConfig, ListConfig)):
        items = node.items() if isinstance(node, DictConfig) else enumerate(node)
        for key, value in items:
            name = f"{prefix}{key}" if isinstance(node, DictConfig) else f"{prefix.rstrip('.')}[{key}]"
            check_finite(value, f"{name}.")
        return
    _require(not isinstance(node, float) or math.isfinite(node),
             f"{prefix.rstrip('.')}={node} is not a finite number; give a finite value")


def _check_own_data(d: DictConfig, kind_name: str, formats: tuple) -> None:
    from .kinds import get_kind

    kind = get_kind(kind_name)
    _one_of(d.format, formats, "data.format")
    _require(d.val_fraction is None or 0 < d.val_fraction < 1,
             f"data.val_fraction={d.val_fraction} must be between 0 and 1 (e.g. 0.05) or null")
    _require(d.val_file is None or d.val_fraction is None,
             "data.val_file and data.val_fraction are both set; keep one (set the other to null)")
    own = [key for key in ("train_file", "val_file", "val_fraction") if d[key] is not None]
    _require(not own or kind.reads_data_files,
             f"data.{own[0] if own else ''} does not apply to task.kind={kind_name} (its task reads its own splits); "
             "use a causal-LM task")


def _check_optimizer(o: DictConfig) -> None:
    from .training.parts import OPTIMIZERS, SCHEDULERS

    _one_of(o.name, OPTIMIZERS, "optimizer.name")
    _one_of(o.scheduler, SCHEDULERS, "optimizer.scheduler")
    _require(o.lr > 0, f"optimizer.lr={o.lr} must be > 0")
    _require(o.weight_decay >= 0, f"optimizer.weight_decay={o.weight_decay} must be >= 0")
    _require(0 <= o.warmup_ratio < 1, f"optimizer.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optimizer.betas={list(o.betas)} needs two values in [0, 1)")
    _require(o.eps > 0, f"optimizer.eps={o.eps} must be > 0")
    _require(o.max_grad_norm is None or o.max_grad_norm > 0,
             f"optimizer.max_grad_norm={o.max_grad_norm} must be > 0 or null")


def config_value(cfg, dotted: str, default=None):
    """``cfg.a.b`` for a DictConfig or a plain dict, ``default`` when any part is missing (a leaf helper: the
    method and task-kind classes read plain values out of a config through it)."""
    node = cfg
    for part in dotted.split("."):
        if node is None or part not in node:
            return default
        node = node[part]
    return node
