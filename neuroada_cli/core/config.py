"""NeuroAdaConfig: what to adapt and how. A plain validated dataclass, no Hydra."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import UserError

SELECTIONS = ("magnitude", "reverse", "random", "gradient")
IMPLS = ("fused", "reference")
SCOPES = ("neuron", "layer", "global")
# neuroada.mode: merged = W holds orig + delta (the frozen model's forward, full-precision bases); unmerged = W is
# never written, the forward adds the delta's product (quantized or shared bases); auto = unmerged iff quantized.
MODES = ("auto", "merged", "unmerged")


@dataclass
class NeuroAdaConfig:
    """Settings of one NeuroAda adapter.

    k: connections kept per output neuron (row of W); the delta has d_out x k entries per layer.
    target_modules: names of nn.Linear modules to adapt. An entry matches a module whose last name
        component equals it (``q_proj``) or, if it contains regex characters, whose full dotted name
        matches it entirely (``model\\.layers\\.\\d+\\.mlp\\..*``).
    selection: magnitude (largest |W|, the paper), reverse (smallest |W|), random, gradient (largest
        |dL/dW| over a few batches).
    train_bias: also train the biases of the target layers.
    modules_to_save: modules trained fully and saved with the adapter (e.g. a classification head).
    seed: seed for random selection.
    impl: fused (base weight kept merged in place, sparse backward) or reference (materialise
        W + scatter(delta) every forward, the authors' approach; for tests and benchmarks).
    scope: where the budget of d_out x k cells per layer goes. neuron: k per output row (the method);
        layer: the layer's d_out x k best-scoring cells anywhere in it; global: the sum over target
        layers of d_out x k best-scoring cells anywhere in any target layer, compared by raw score
        (|W| un-normalised, as the authors' ablation). Ablation only; magnitude, reverse or random.
    neuron_fraction: only this seeded fraction of each layer's rows (round(f x d_out)) gets its k
        cells; the budget shrinks to round(f x d_out) x k per layer. scope=neuron only.
    mode: merged (W holds orig + delta at the cells; the frozen model's forward), unmerged (W never
        written; the forward adds the delta's sparse product: quantized or shared bases) or auto
        (unmerged iff the layer is quantized).
    """

    k: int = 20
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    selection: str = "magnitude"
    train_bias: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    seed: int = 0
    impl: str = "fused"
    scope: str = "neuron"
    neuron_fraction: float = 1.0
    mode: str = "auto"

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        self.target_modules = list(self.target_modules)
        self.modules_to_save = list(self.modules_to_save or [])
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise UserError(f"neuroada k={self.k!r} is invalid; use a whole number >= 1 (the paper uses 1 or 20)")
        if self.selection not in SELECTIONS:
            raise UserError(f"neuroada selection={self.selection!r} is unknown; use one of {', '.join(SELECTIONS)}")
        if self.impl not in IMPLS:
            raise UserError(f"neuroada impl={self.impl!r} is unknown; use one of {', '.join(IMPLS)}")
        if self.mode not in MODES:
            raise UserError(f"neuroada mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
        self._check_placement()
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            raise UserError("neuroada target_modules is empty; name at least one nn.Linear, e.g. [q_proj, v_proj]")

    def _check_placement(self) -> None:
        if self.scope not in SCOPES:
            raise UserError(f"neuroada scope={self.scope!r} is unknown; use one of {', '.join(SCOPES)}")
        fraction = self.neuron_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise UserError(f"neuroada neuron_fraction={fraction!r} is invalid; use a number in (0, 1], e.g. 0.5")
        self.neuron_fraction = float(fraction)
        if self.scope != "neuron" and self.selection == "gradient":
            raise UserError(f"neuroada scope={self.scope} needs selection magnitude, reverse or random "
                            "(gradient selection is per neuron only); set neuroada.scope=neuron")
        if self.scope != "neuron" and self.neuron_fraction < 1:
            raise UserError(f"neuroada neuron_fraction={self.neuron_fraction} applies to scope=neuron only; "
                            f"set neuroada.neuron_fraction=1 or neuroada.scope=neuron")

    def layer_mode(self, quantized: bool) -> str:
        """The mode one layer runs in: auto = unmerged iff its base is quantized."""
        if self.mode == "auto":
            return "unmerged" if quantized else "merged"
        if self.mode == "merged" and quantized:
            raise UserError("neuroada mode=merged cannot write a quantized base; use neuroada.mode=unmerged "
                            "(or auto)")
        return self.mode

    @property
    def per_row(self) -> bool:
        """True for the method itself: exactly k cells on every row (the fixed [d_out, k] layout)."""
        return self.scope == "neuron" and self.neuron_fraction >= 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "NeuroAdaConfig":
        known = {name: values[name] for name in cls.__dataclass_fields__ if name in values}
        return cls(**known)
