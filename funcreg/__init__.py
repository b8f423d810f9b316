"""funcreg: regularization as pure functions for PyTorch.

Penalties say *which* parameters and *which* regularizer; strengths are data passed at
call time, so ``torch.func.grad``/``vmap`` train many strengths at once.
"""

import importlib.metadata as _metadata

from . import activity, distributed, keras, optim, plot, prox
from ._path import geometric_grid, path, strength_max
from ._sweep import sweep
from ._tune_net import Training
from .declare import regularize, spec_of
from .eager import (
    buffers,
    from_keras,
    from_sklearn,
    from_weight_decay,
    param_groups,
    params,
    penalty,
    prox_,
)
from .hooks import Attached, attach
from .hypergrad import Hypergradient, hypergrad
from .penalties import (
    L1,
    L2,
    MCP,
    SCAD,
    Box,
    Constraint,
    ElasticNet,
    GroupLasso,
    MaxNorm,
    MinMaxNorm,
    NonNegative,
    Nuclear,
    Orthogonal,
    Penalty,
    SparseGroupLasso,
    SpectralNorm,
    UnitNorm,
)
from .result import Best, SweepResult
from .selection import CVResult, cross_validate
from .selectors import (
    Selector,
    as_selector,
    biases,
    by_module,
    by_name,
    by_ndim,
    everything,
    norm_layers,
    weights,
)
from .solvers import LeastSquares, Solution, from_sklearn_logistic, least_squares, solve
from .spec import Spec, as_spec, penalized
from .stack import grid, load_, stack, stack_modules, unstack
from .train import split_spec, train_step
from .tune import TuneResult, tune
from .unrolled import unrolled_hypergrad

try:
    __version__ = _metadata.version("funcreg")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "keras",
    "activity",
    "Attached",
    "attach",
    "regularize",
    "spec_of",
    "distributed",
    "path",
    "cross_validate",
    "CVResult",
    "sweep",
    "unstack",
    "stack_modules",
    "stack",
    "load_",
    "grid",
    "SweepResult",
    "Best",
    "Hypergradient",
    "hypergrad",
    "unrolled_hypergrad",
    "tune",
    "Training",
    "TuneResult",
    "strength_max",
    "solve",
    "from_sklearn_logistic",
    "plot",
    "least_squares",
    "geometric_grid",
    "Solution",
    "LeastSquares",
    "L1",
    "L2",
    "MCP",
    "SCAD",
    "Box",
    "Constraint",
    "ElasticNet",
    "GroupLasso",
    "MaxNorm",
    "MinMaxNorm",
    "NonNegative",
    "Nuclear",
    "Orthogonal",
    "Penalty",
    "Selector",
    "SparseGroupLasso",
    "Spec",
    "SpectralNorm",
    "UnitNorm",
    "__version__",
    "as_selector",
    "as_spec",
    "biases",
    "buffers",
    "by_module",
    "by_name",
    "by_ndim",
    "everything",
    "from_keras",
    "from_sklearn",
    "from_weight_decay",
    "norm_layers",
    "optim",
    "param_groups",
    "params",
    "penalized",
    "penalty",
    "prox",
    "prox_",
    "split_spec",
    "train_step",
    "weights",
]
