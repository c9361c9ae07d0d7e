"""lambda-gelu: learn how hard each GELU gate should be, then turn the network into an exact ReLU network."""

from lambda_gelu.calibrate import DEFAULT_TAU, calibrate, discrepancy, layer_targets, target_lambda
from lambda_gelu.convert import (
    FunctionalGELUWarning,
    NoMatchError,
    NotGELUError,
    UnconvertibleGateError,
    channel_counts,
    convert,
    convert_fx,
    functional_gelu_calls,
    relufy,
    replace_modules,
)
from lambda_gelu.fold import FoldReport, fold_lambda
from lambda_gelu.gates import SmoothGateError, SmoothOp, assert_relu, smooth_gates
from lambda_gelu.gelu_types import register_gelu_type
from lambda_gelu.harden import HardenConfig, Reluized, reluize
from lambda_gelu.kernels import compile_status, set_compile_mode
from lambda_gelu.metrics import Disruption, Evaluation, disruption, evaluate
from lambda_gelu.module import LambdaGELU
from lambda_gelu.ops import lambda_gelu
from lambda_gelu.optim import param_groups
from lambda_gelu.profile import HardnessRecorder, LayerHardness, hardness
from lambda_gelu.schedule import Hardener, lambda_at
from lambda_gelu.swap_train import Swapped, swap_and_train
from lambda_gelu.version import __version__

__all__ = [
    "DEFAULT_TAU",
    "Disruption",
    "Evaluation",
    "FoldReport",
    "FunctionalGELUWarning",
    "HardenConfig",
    "Hardener",
    "HardnessRecorder",
    "LambdaGELU",
    "LayerHardness",
    "NoMatchError",
    "NotGELUError",
    "Reluized",
    "SmoothGateError",
    "SmoothOp",
    "Swapped",
    "UnconvertibleGateError",
    "__version__",
    "assert_relu",
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
    "reluize",
    "replace_modules",
    "set_compile_mode",
    "smooth_gates",
    "swap_and_train",
    "target_lambda",
]
