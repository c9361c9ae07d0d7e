"""Formal local-robustness verification with Marabou (PyPI ``maraboupy``), which reads ONNX.

For a test point x of class y (that the model classifies correctly) and each
other class j, one query asks: is there an input x' with |x' − x|∞ <= ε,
inside the data's range, where logit_j(x') >= logit_y(x')? Marabou answers
``unsat`` (no such input: robust against j), ``sat`` (with a counterexample)
or runs out of time. A point is *verified* when every query is unsat,
*falsified* as soon as one is sat (the counterexample is re-checked in
PyTorch), *timeout* otherwise. Classes are tried in order of the point's
logits, the runner-up first, since that is where a counterexample is likeliest.

Marabou handles piecewise-linear networks (ReLU, max-pool, ...) exactly; a
network it cannot encode is rejected when its ONNX file is read, and the
verifier's own error is what this module reports.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import importlib.metadata
import inspect
import math
import os
import re
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lambda_gelu.checkpoint import activation_layout

POINT_STATUSES = ("verified", "falsified", "timeout", "misclassified", "error")


@dataclass(frozen=True)
class PointResult:
    """The verdict on one test point, with the queries it took."""

    index: int
    label: int
    status: str
    seconds: float
    queries: int
    counterexample_class: int | None = None
    counterexample_margin: float | None = None
    counterexample_confirmed: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class VerificationResult:
    """Marabou on one model: rejected (with the verifier's own error and where it was raised) or the verdicts."""

    accepted: bool
    epsilon: float
    timeout_s: int
    rejection: str | None = None
    rejected_at: str | None = None
    unsupported_ops: list[str] = field(default_factory=list)
    points: list[PointResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def counts(self) -> dict[str, int]:
        """How many points ended in each status."""
        return {status: sum(p.status == status for p in self.points) for status in POINT_STATUSES}

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (with the counts), for JSON."""
        out = asdict(self)
        out["points"] = [p.to_dict() for p in self.points]
        out["counts"] = self.counts
        return out


def marabou_version() -> str:
    """The installed maraboupy version."""
    return importlib.metadata.version("maraboupy")


def _marabou():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Tensorflow parser is unavailable ..."
        from maraboupy import Marabou, MarabouCore
    return Marabou, MarabouCore


def parser_ops() -> frozenset[str]:
    """The ONNX op types the installed maraboupy's ONNX parser has an encoding for (read from its source)."""
    from maraboupy.parsers.ONNXParser import ONNXParser

    source = inspect.getsource(ONNXParser.makeMarabouEquations)
    return frozenset(re.findall(r"op_type == ['\"](\w+)['\"]", source))


def is_mlp(model: nn.Module) -> bool:
    """True if every leaf module is a Linear, a gate, Flatten, Identity or Dropout (no conv, norm, attention)."""
    gates = set(activation_layout(model))
    plain = (nn.Linear, nn.Flatten, nn.Identity, nn.Dropout)
    leaves = [(name, m) for name, m in model.named_modules() if not list(m.children())]
    return any(isinstance(m, nn.Linear) for _, m in leaves) and all(
        isinstance(m, plain) or name in gates for name, m in leaves
    )


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null (Marabou's C++ core prints there), then restore it."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _error_site(error: BaseException) -> str:
    """``file:line in function`` of the innermost frame of ``error``'s traceback."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f"{Path(last.filename).name}:{last.lineno} in {last.name}"


def read_network(onnx_path: str | Path):
    """``Marabou.read_onnx`` of the file (raises whatever the verifier raises for a network it cannot encode)."""
    Marabou, _ = _marabou()
    with _stdout_silenced():
        return Marabou.read_onnx(str(onnx_path))


class _Queries:
    """One Marabou network and the robustness queries asked of it."""

    def __init__(self, network: Any, model: nn.Module, domain: tuple[float, float], timeout_s: int) -> None:
        Marabou, self.core = _marabou()
        self.network = network
        self.model = model  # a float64 copy: counterexamples are checked without float32 rounding
        self.domain = domain
        self.inputs = [int(v) for v in network.inputVars[0].flatten()]
        self.outputs = [int(v) for v in network.outputVars[0].flatten()]
        self.options = Marabou.createOptions(verbosity=0, timeoutInSeconds=timeout_s)

    def solve(self, x: np.ndarray, epsilon: float, label: int, other: int) -> tuple[str, dict[int, float]]:
        """Is there x' in the ε-box around x (inside the domain) with logit_other >= logit_label?"""
        query = self.network.getInputQuery()
        lo, hi = self.domain
        for var, value in zip(self.inputs, x, strict=True):
            query.setLowerBound(var, max(lo, value - epsilon))
            query.setUpperBound(var, min(hi, value + epsilon))
        violation = self.core.Equation(self.core.Equation.LE)  # logit_label − logit_other <= 0
        violation.addAddend(1.0, self.outputs[label])
        violation.addAddend(-1.0, self.outputs[other])
        violation.setScalar(0.0)
        query.addEquation(violation)
        with _stdout_silenced():
            exit_code, values, stats = self.core.solve(query, self.options, "")
        if stats.hasTimedOut() or exit_code == "TIMEOUT":
            return "timeout", {}
        return exit_code, values

    @torch.no_grad()
    def logits(self, flat: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
        """The PyTorch model's logits (float64) at a flat input of one example's ``shape``."""
        return self.model(torch.from_numpy(flat).reshape(1, *shape)).reshape(-1)

    def point(self, index: int, x: torch.Tensor, label: int, epsilon: float) -> PointResult:
        """Verify, falsify or time out on one point."""
        start = time.perf_counter()
        flat = x.detach().double().reshape(-1).numpy()
        logits = self.logits(flat, tuple(x.shape))
        if int(logits.argmax()) != label:
            return PointResult(index, label, "misclassified", time.perf_counter() - start, 0)
        others = [int(c) for c in logits.argsort(descending=True) if int(c) != label]
        status, asked = "verified", 0
        for other in others:
            asked += 1
            code, values = self.solve(flat, epsilon, label, other)
            if code == "sat":
                found = np.array([values[v] for v in self.inputs])
                at = self.logits(found, tuple(x.shape))
                margin = float(at[other] - at[label])  # >= 0 (up to the solver's tolerance): a real counterexample
                lo, hi = self.domain
                inside = bool(np.all(np.abs(found - flat) <= epsilon + 1e-9)
                              and np.all(found >= lo - 1e-9) and np.all(found <= hi + 1e-9))
                return PointResult(index, label, "falsified", time.perf_counter() - start, asked, other, margin,
                                   inside and margin >= -1e-6 * max(1.0, float(at.abs().max())))
            if code == "timeout":
                status = "timeout"
            elif code != "unsat":
                return PointResult(index, label, "error", time.perf_counter() - start, asked)
        return PointResult(index, label, status, time.perf_counter() - start, asked)


def verify_robustness(
    onnx_path: str | Path,
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    epsilon: float,
    timeout_s: float,
    domain: tuple[float, float] = (-math.inf, math.inf),
) -> VerificationResult:
    """Local L∞ robustness of ``model`` (exported at ``onnx_path``) at each of ``inputs``, by Marabou.

    ``domain`` clips the ε-box to the range the inputs can take. If Marabou
    cannot read the network, the result says so with the verifier's error and
    the graph's ops that its parser has no encoding for.
    """
    if epsilon < 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")
    timeout = max(1, math.ceil(timeout_s))  # Marabou takes whole seconds
    start = time.perf_counter()
    try:
        network = read_network(onnx_path)
    except Exception as error:  # the verifier's own rejection, reported as such
        from lambda_gelu.export import op_census

        unsupported = sorted(set(op_census(onnx_path)) - parser_ops())
        return VerificationResult(
            accepted=False, epsilon=epsilon, timeout_s=timeout,
            rejection=f"{type(error).__name__}: {error}", rejected_at=_error_site(error),
            unsupported_ops=unsupported, seconds=time.perf_counter() - start,
        )
    queries = _Queries(network, copy.deepcopy(model).double().eval(), domain, timeout)
    points = [queries.point(i, inputs[i], int(labels[i]), epsilon) for i in range(len(inputs))]
    return VerificationResult(accepted=True, epsilon=epsilon, timeout_s=timeout, points=points,
                              seconds=time.perf_counter() - start)
