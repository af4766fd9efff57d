"""The run config's schema: one dataclass per section, the allowed values, and key listings.

``config.validate`` checks a composed config against these dataclasses (unknown keys are errors);
the YAML files in configs/ give the values, these classes only say which keys exist.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import List, Optional

METHODS = ("neuroada", "lora", "full")
SELECTIONS = ("magnitude", "reverse", "random", "gradient")
IMPLS = ("fused", "reference")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("linear", "constant", "cosine")
OPTIMIZERS = ("adamw",)
SCORINGS = ("generate", "loglik", "loglik_norm")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------------------- schema
@dataclass
class ModelSection:
    name_or_path: str = "embedded:smollm2-135m-instruct"
    gguf_file: Optional[str] = None
    dtype: str = "float32"
    family: str = "auto"


@dataclass
class NeuroAdaSection:
    k: int = 20
    selection: str = "magnitude"
    target_modules: List[str] = field(default_factory=lambda: list(ALL_LINEAR))
    train_bias: bool = False
    modules_to_save: List[str] = field(default_factory=list)
    impl: str = "fused"
    seed: int = 0
    gradient_batches: int = 4


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: List[str] = field(default_factory=lambda: list(ALL_LINEAR))
    modules_to_save: Optional[List[str]] = None  # trained fully; null = PEFT's default (the classifier head)


@dataclass
class TaskSection:
    name: str = "commonsense"
    kind: str = "causal_lm"
    train_dataset: str = "commonsense_15k"
    template: str = "commonsense"
    eval_suite: Optional[str] = "commonsense"
    num_labels: Optional[int] = None      # sequence classification (GLUE)
    problem_type: Optional[str] = None    # regression | single_label_classification
    head_dropout: Optional[float] = None  # dropout before the classification head (null = checkpoint's)


@dataclass
class DataSection:
    dir: Optional[str] = None
    train_limit: Optional[int] = None
    max_length: int = 512
    bucket_batches: int = 32


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
    resume: bool = False
    log_every: int = 1
    checkpoint_every: int = 100
    tensorboard: bool = False
    select_best: bool = False             # GLUE: keep the best epoch on the validation selection part


@dataclass
class EvalSection:
    tasks: Optional[List[str]] = None
    limit: Optional[int] = None
    batch_size: int = 16
    scoring: str = "generate"
    max_new_tokens: Optional[int] = None
    commonsense_rule: str = "trigger"
    aqua_rule: str = "authors"
    merge: bool = True
    after_train: bool = False
    output_dir: Optional[str] = None
    adapter: Optional[str] = None         # set by the CLI: the adapter to evaluate (null = base model)
    run_dir: Optional[str] = None         # set by the CLI for `neuroada eval run=DIR`


@dataclass
class RunConfig:
    recipe: Optional[str] = None
    method: str = "neuroada"
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    neuroada: NeuroAdaSection = field(default_factory=NeuroAdaSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    eval: EvalSection = field(default_factory=EvalSection)


# ------------------------------------------------------------------------------------ key listings
def _schema_keys(schema) -> list[str]:
    return [f.name for f in fields(schema)]


def _section_schema(section: str):
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
    return _schema_keys(_section_schema(section) or RunConfig)


def _valid_keys_text(section: str) -> str:
    while section and _section_schema(section) is None:  # trainer.foo.bar: list what trainer has
        section = section.rpartition(".")[0]
    if not section:
        return f"valid top-level keys: {', '.join(section_keys(''))}"
    return f"valid keys in {section}: {', '.join(section_keys(section))}"
