"""lambda-gelu: learn how hard each GELU gate should be, then turn the network into an exact ReLU network."""

from lambda_gelu.calibrate import DEFAULT_TAU, calibrate, discrepancy, layer_targets, target_lambda
from lambda_gelu.convert import (
    FunctionalGELUWarning,
    NoMatchError,
    channel_counts,
    convert,
    convert_fx,
    functional_gelu_calls,
    register_gelu_type,
    relufy,
    replace_modules,
)
from lambda_gelu.fold import FoldReport, fold_lambda
from lambda_gelu.kernels import compile_status, set_compile_mode
from lambda_gelu.metrics import Disruption, Evaluation, disruption, evaluate
from lambda_gelu.module import LambdaGELU
from lambda_gelu.ops import lambda_gelu
from lambda_gelu.optim import param_groups
from lambda_gelu.profile import HardnessRecorder, LayerHardness, hardness
from lambda_gelu.schedule import Hardener, lambda_at

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TAU",
    "Disruption",
    "Evaluation",
    "FoldReport",
    "FunctionalGELUWarning",
    "Hardener",
    "HardnessRecorder",
    "LambdaGELU",
    "LayerHardness",
    "NoMatchError",
    "__version__",
    "calibrate",
    "channel_counts",
    "compile_status",
    "convert",
    "convert_fx",
    "discrepancy",
    "disruption",
    "evaluate",
    "fold_lambda",
    "functional_gelu_calls",
    "hardness",
    "lambda_at",
    "lambda_gelu",
    "layer_targets",
    "param_groups",
    "register_gelu_type",
    "relufy",
    "replace_modules",
    "set_compile_mode",
    "target_lambda",
]
