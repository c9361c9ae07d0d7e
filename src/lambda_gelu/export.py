"""ONNX export of a model, with an op census and a parity check against onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

SMOOTH_GATE_OPS = frozenset({"Gelu", "Erf", "Tanh"})
"""ONNX ops whose presence means a smooth gate survived (none may be left in a ReLU model)."""

OPSET = 20


@dataclass(frozen=True)
class OnnxReport:
    """What an export produced: the file, its op census, smooth-gate ops left, parity with PyTorch."""

    path: str
    op_counts: dict[str, int] = field(default_factory=dict)
    smooth_gate_ops: list[str] = field(default_factory=list)
    max_abs_diff: float = float("nan")
    parity_ok: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = OPSET) -> Path:
    """Export ``model`` (eval mode, CPU) to one self-contained ONNX file with a dynamic batch dim.

    Uses the torch.export-based exporter (``dynamo=True``, onnxscript). The
    file is written to a temporary name and renamed into place.
    """
    path = Path(path)
    model = model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    batch = torch.export.Dim("batch", min=1)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # the exporter logs unrelated notes (e.g. torchvision ops it skips)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamo=True,
                opset_version=opset,
                external_data=False,
                input_names=["input"],
                output_names=["logits"],
                dynamic_shapes=({0: batch},),
                verbose=False,
            )
    except BaseException:
        tmp.unlink(missing_ok=True)  # leave no half-written export behind
        raise
    finally:
        exporter_log.setLevel(level)
    os.replace(tmp, path)
    return path


def op_census(path: str | Path) -> dict[str, int]:
    """How many nodes of each op type the ONNX graph (and its functions) holds."""
    import onnx

    graph_model = onnx.load(str(path))
    counts: Counter[str] = Counter(node.op_type for node in graph_model.graph.node)
    for function in graph_model.functions:
        counts.update(node.op_type for node in function.node)
    return dict(sorted(counts.items()))


def check_onnx(model: nn.Module, inputs: torch.Tensor, path: str | Path, atol: float = 1e-4) -> OnnxReport:
    """Census the ONNX file at ``path`` and compare onnxruntime's outputs with ``model``'s on ``inputs``."""
    import onnxruntime as ort

    counts = op_census(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    onnx_out = torch.from_numpy(session.run(None, {name: inputs.detach().cpu().numpy()})[0])
    with torch.no_grad():
        torch_out = model.eval()(inputs).detach().cpu()
    diff = float((onnx_out - torch_out).abs().max())
    return OnnxReport(
        path=str(path),
        op_counts=counts,
        smooth_gate_ops=sorted(SMOOTH_GATE_OPS & set(counts)),
        max_abs_diff=diff,
        parity_ok=diff <= atol,
    )
