"""int8 post-training quantization through torchao's PT2E flow for x86 CPUs, with the fusions it made.

The route (torchao >= 0.10; the PT2E APIs left ``torch.ao.quantization`` for
torchao): ``torch.export`` → ``prepare_pt2e`` with ``X86InductorQuantizer``
(per-channel int8 weights, per-tensor uint8 activations) → calibration on
training batches → ``convert_pt2e`` (a graph with quantize/dequantize nodes)
→ ``lower_pt2e_quantized_to_x86`` (Inductor's freezing passes: oneDNN int8
kernels ``onednn.qlinear_pointwise`` / ``onednn.qconv_pointwise``, BatchNorm
folded into the convolution, a following ReLU fused in as the kernel's
post-op). Which gates fused is read off the lowered graph, not assumed.

On a CPU without VNNI (e.g. AVX2 only), oneDNN's int8 kernels multiply
u8 × s8 with ``vpmaddubsw``, which adds each adjacent pair of products in
int16 *with saturation*: 2 · 255 · 127 overflows, and the int8 graph then
computes something other than its Q/DQ graph. There the weights are
quantized to 7 bits (int8 in [-64, 63]), for which a pair stays within int16
(see ``needs_seven_bit_weights``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lambda_gelu.checkpoint import activation_layout

COMPUTE_OPS = {
    "aten.linear.default": "Linear",
    "aten.conv1d.default": "Conv",
    "aten.conv2d.default": "Conv",
    "aten.conv3d.default": "Conv",
}
"""fp32 ops (as ``torch.export`` writes them) that the x86 quantizer turns into int8 kernels."""

INT8_OPS = {"onednn.qlinear_pointwise.default": "Linear", "onednn.qconv_pointwise.default": "Conv",
            "onednn.qconv2d_pointwise.default": "Conv"}
"""The oneDNN int8 kernels of the lowered graph, by the fp32 op kind they replace."""

POST_OP_ARGUMENT = {"Linear": "post_op_name", "Conv": "attr"}
"""Name of the fused post-op argument in each int8 kernel's schema."""

LAYOUT_OPS = frozenset({"aten.reshape", "aten.view", "aten.flatten.using_ints", "aten.permute", "aten.t",
                        "aten.clone", "aten.contiguous"})
"""Ops that only move or relabel data: not counted among the fp32 ops left in the int8 graph."""

BATCH_NORM_OPS = frozenset({"aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default"})
GATE_NAMES = {"relu": "ReLU", "gelu": "GELU", "lambda_gelu": "λ-GELU"}
"""Display names of the gate kinds that ``activation_layout`` reports."""
_IGNORED_OPS = ("aten._assert_tensor_metadata", "aten.to.", "aten.promote_types", "_operator.getitem",
                "quantized_decomposed.")


@dataclass(frozen=True)
class FusionRow:
    """One Linear/Conv of the model, what follows it, and what the int8 graph made of them.

    ``quantized`` is False where the layer stayed an fp32 op, None where the
    graphs could not be matched; ``post_op`` is the int8 kernel's fused
    post-op (``relu``, or ``none``).
    """

    compute: str
    kind: str
    batch_norm: str | None
    gate: str | None
    gate_kind: str | None
    quantized: bool | None
    int8_op: str | None
    post_op: str | None
    batch_norm_folded: bool | None
    gate_fused: bool
    gate_ops_left: list[str] = field(default_factory=list)

    @property
    def pattern(self) -> str:
        """The fp32 pattern, e.g. ``Conv-BN-ReLU`` or ``Linear-GELU``."""
        parts = [self.kind] + (["BN"] if self.batch_norm else [])
        if self.gate_kind:
            parts.append(GATE_NAMES.get(self.gate_kind, self.gate_kind))
        return "-".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (with the pattern), for JSON."""
        return dict(asdict(self), pattern=self.pattern)


@dataclass(frozen=True)
class QuantizationResult:
    """What int8 PTQ did to one model: fusions, op census, accuracy and latency before/after.

    ``int8_op_counts`` counts the oneDNN kernels and (de)quantize ops of the
    lowered graph; ``fp32_ops_left`` the other compute ops still run in fp32
    there (an unfused gate, for instance); layout ops are in neither.
    """

    fusions: list[FusionRow]
    int8_op_counts: dict[str, int]
    fp32_ops_left: dict[str, int]
    accuracy_fp32: float
    accuracy_int8: float
    agreement: float
    batch: int
    latency_fp32_ms: float
    latency_int8_ms: float
    repeats: int
    threads: int
    weight_bits: int = 8
    """8, or 7 on a CPU without VNNI (see ``needs_seven_bit_weights``)."""

    @property
    def speedup(self) -> float:
        """fp32 latency / int8 latency (> 1: int8 is faster)."""
        return self.latency_fp32_ms / self.latency_int8_ms

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        out = asdict(self)
        out["fusions"] = [row.to_dict() for row in self.fusions]
        out["speedup"] = self.speedup
        return out


@contextlib.contextmanager
def quiet_torchao() -> Iterator[None]:
    """Silence torchao's import-time notes (CUDA kernels it cannot load here) and export's FutureWarnings."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree", "torch._export")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _module_of(node: torch.fx.Node) -> str | None:
    """Qualified name of the innermost module a graph node came from (None if unknown)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return next(reversed(stack.values()))[0] or None


def _op_name(node: torch.fx.Node) -> str:
    return str(node.target)


def _consumers(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The nodes that use ``node``'s value, looking through dtype casts, getitem and metadata asserts."""
    found = []
    for user in node.users:
        if _op_name(user).startswith(_IGNORED_OPS):
            found += _consumers(user)
        else:
            found.append(user)
    return found


def float_patterns(graph: torch.fx.Graph, gates: dict[str, str]) -> list[tuple[str, str, str | None, str | None]]:
    """(compute module, kind, BatchNorm module, gate module) for each Linear/Conv of an exported fp32 graph.

    ``gates`` maps gate module names to their kind. A BatchNorm counts when it
    is the only consumer of the convolution; the gate is the gate module that
    consumes the (normalized) output.
    """
    rows = []
    for node in graph.nodes:
        kind = COMPUTE_OPS.get(_op_name(node)) if node.op == "call_function" else None
        if kind is None:
            continue
        users = _consumers(node)
        batch_norm = None
        if len(users) == 1 and _op_name(users[0]) in BATCH_NORM_OPS:
            batch_norm = _module_of(users[0])
            users = _consumers(users[0])
        gate = next((m for u in users if (m := _module_of(u)) in gates), None)
        rows.append((_module_of(node) or node.name, kind, batch_norm, gate))
    return rows


def _schema_args(node: torch.fx.Node) -> dict[str, Any]:
    names = [a.name for a in node.target._schema.arguments]
    values = dict(zip(names, node.args, strict=False))
    values.update(node.kwargs)
    return values


FP32_COMPUTE_OPS = {"aten.convolution.default": "Conv", "aten.linear.default": "Linear",
                    "aten.addmm.default": "Linear", "aten.mm.default": "Linear"}
"""Linear/Conv ops that the lowering left in fp32 (the quantizer did not annotate them)."""


def _attribute(module: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    value: Any = module
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) else None


def _out_channels(module: torch.fx.GraphModule, node: torch.fx.Node) -> int | None:
    """Output channels of a lowered Linear/Conv node, where the graph shows them (else None)."""
    if _op_name(node) in INT8_OPS:
        scale = _attribute(module, _schema_args(node).get("w_scale"))  # per-channel weight scales
        return scale.numel() if scale is not None and scale.numel() > 1 else None
    if _op_name(node) == "aten.convolution.default":
        weight = _attribute(module, node.args[1])
        return None if weight is None or weight.is_mkldnn else int(weight.shape[0])
    return None


def fusion_table(model: nn.Module, float_graph: torch.fx.Graph, lowered: torch.fx.GraphModule) -> list[FusionRow]:
    """Match every fp32 Linear/Conv of ``model`` with what the lowered int8 graph made of it.

    Linear/Conv nodes are matched in graph order within each kind, and the
    match is checked against each layer's output channels; if the two graphs
    do not line up, the int8 columns are left empty (None) rather than guessed.
    """
    gates = {name: spec["kind"] for name, spec in activation_layout(model).items()}
    patterns = float_patterns(float_graph, gates)
    lowered_compute: dict[str, list[torch.fx.Node]] = {"Linear": [], "Conv": []}
    gate_ops: dict[str, list[str]] = {}
    batch_norms_left = set()
    for node in lowered.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node)
        if name in INT8_OPS or name in FP32_COMPUTE_OPS:
            lowered_compute[INT8_OPS.get(name) or FP32_COMPUTE_OPS[name]].append(node)
        elif name in BATCH_NORM_OPS:
            batch_norms_left.add(_module_of(node))
        elif (module := _module_of(node)) in gates and not name.startswith(_IGNORED_OPS):
            gate_ops.setdefault(module, []).append(name.removesuffix(".default"))
    queues = {kind: list(nodes) for kind, nodes in lowered_compute.items()}
    matches: list[torch.fx.Node | None] = []
    for compute, kind, _, _ in patterns:
        node = queues[kind].pop(0) if queues[kind] else None
        weight = getattr(_submodule(model, compute), "weight", None)
        found = None if node is None else _out_channels(lowered, node)
        if node is None or (found is not None and weight is not None and found != weight.shape[0]):
            matches = [None] * len(patterns)
            break
        matches.append(node)
    if any(queues.values()):
        matches = [None] * len(patterns)
    rows = []
    for (compute, kind, batch_norm, gate), node in zip(patterns, matches, strict=True):
        quantized = None if node is None else _op_name(node) in INT8_OPS
        int8_op = post_op = None
        if quantized:
            int8_op = _op_name(node).removeprefix("onednn.").removesuffix(".default")
            post_op = str(_schema_args(node).get(POST_OP_ARGUMENT[kind], "none")) or "none"
        fused = gate is not None and post_op not in (None, "none") and not gate_ops.get(gate)
        rows.append(FusionRow(
            compute=compute,
            kind=kind,
            batch_norm=batch_norm,
            gate=gate,
            gate_kind=gates.get(gate) if gate else None,
            quantized=quantized,
            int8_op=int8_op,
            post_op=post_op,
            batch_norm_folded=None if batch_norm is None else batch_norm not in batch_norms_left,
            gate_fused=fused,
            gate_ops_left=gate_ops.get(gate, []) if gate else [],
        ))
    return rows


def _submodule(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def op_counts(graph: torch.fx.Graph) -> dict[str, int]:
    """How many call_function nodes of each op the graph holds (``.default`` dropped)."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_function" and not _op_name(node).startswith(("aten._assert_tensor_metadata",)):
            name = _op_name(node).removesuffix(".default")
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def export_graph(model: nn.Module, example: torch.Tensor, dynamic_batch: bool) -> torch.fx.GraphModule:
    """``torch.export`` of ``model`` in eval mode, as a GraphModule (batch dim dynamic if asked)."""
    shapes = ({0: torch.export.Dim("batch", min=2)},) if dynamic_batch else None
    with quiet_torchao():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=shapes).module()


_VNNI_FEATURES = ("avx512_vnni", "avx_vnni", "amx_int8")
"""CPU features with a u8 × s8 → s32 dot product that oneDNN's int8 kernels use instead of ``vpmaddubsw``."""

_NO_VNNI_ISA_CAPS = frozenset({"SSE41", "AVX", "AVX2", "AVX512_CORE"})
"""``ONEDNN_MAX_CPU_ISA`` values that keep oneDNN off the VNNI instructions even where the CPU has them."""


def cpu_has_vnni() -> bool:
    """Whether oneDNN's int8 kernels can use a VNNI (or AMX) dot product on this CPU.

    Reads the CPU features that PyTorch detects (``torch.cpu.get_capabilities``,
    else the older ``_is_vnni_supported``, which sees AVX512-VNNI only), and an
    ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA`` cap below VNNI.
    """
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper()
    if cap in _NO_VNNI_ISA_CAPS:
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        found = capabilities()
        return any(bool(found.get(name, False)) for name in _VNNI_FEATURES)
    check = getattr(torch.cpu, "_is_vnni_supported", None) or getattr(torch._C._cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


SEVEN_BIT_WEIGHTS = (-64, 63)
"""int8 weight range without VNNI: a pair of u8 × s8 products is then at most 2 · 255 · 64 = 32640 < 2**15."""


def needs_seven_bit_weights() -> bool:
    """Whether int8 weights must be quantized to 7 bits here for oneDNN's kernels to compute the Q/DQ graph.

    Without VNNI, oneDNN multiplies u8 activations by s8 weights with
    ``vpmaddubsw``, which sums adjacent pairs of products in int16 and
    saturates (2 · 255 · 127 = 64770 > 32767); see oneDNN's "Nuances of int8
    computations". torchao's remedy, ``reduce_range`` of
    ``get_default_x86_inductor_quantization_config`` (7-bit activations), is
    not enough with the x86 lowering: a kernel that requantizes its output
    (``qlinear_pointwise`` with a uint8 output) clamps to [0, 255], not to the
    [0, 127] of the Q/DQ graph, so an activation above the calibrated range
    reaches the next kernel as an 8-bit value. Weights are constants, fully
    described by the Q/DQ graph, so narrowing them keeps both graphs equal.
    """
    return not cpu_has_vnni()


def int8_quantization_config(seven_bit_weights: bool) -> Any:
    """torchao's default x86 PTQ config (per-channel int8 weights, per-tensor uint8 activations), weights in
    ``SEVEN_BIT_WEIGHTS`` if asked."""
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    config = get_default_x86_inductor_quantization_config()
    if not seven_bit_weights:
        return config
    low, high = SEVEN_BIT_WEIGHTS
    return dataclasses.replace(config, weight=dataclasses.replace(config.weight, quant_min=low, quant_max=high))


def quantize_int8(
    model: nn.Module, calibration: Sequence[torch.Tensor], example: torch.Tensor,
    seven_bit_weights: bool | None = None,
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """PT2E int8 PTQ of ``model``: returns (Q/DQ reference graph, lowered x86 graph for ``example``'s shape).

    ``calibration`` batches (each of >= 2 rows) set the activation ranges. The
    lowered graph runs oneDNN int8 kernels and accepts only ``example``'s
    shape (see ``run_fixed_batch``). ``seven_bit_weights`` defaults to what
    this CPU needs (``needs_seven_bit_weights``); turning it off on a CPU
    without VNNI gives an int8 graph whose sums saturate.
    """
    if seven_bit_weights is None:
        seven_bit_weights = needs_seven_bit_weights()
    if not calibration or min(len(batch) for batch in calibration) < 2:
        raise ValueError("calibration needs at least one batch, each of two rows or more")
    with quiet_torchao():
        from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import X86InductorQuantizer

        quantizer = X86InductorQuantizer()
        quantizer.set_global(int8_quantization_config(seven_bit_weights))
        prepared = prepare_pt2e(export_graph(model, calibration[0], dynamic_batch=True), quantizer)
        with torch.no_grad():
            for batch in calibration:
                prepared(batch)
            reference = convert_pt2e(prepared)
            lowered = lower_pt2e_quantized_to_x86(reference, (example,))
    _views_to_reshapes(lowered)
    return reference, lowered


def _views_to_reshapes(graph_module: torch.fx.GraphModule) -> None:
    """Turn ``aten.view`` into ``aten.reshape`` in a lowered graph (in place).

    oneDNN's int8 convolutions return channels-last tensors, on which the
    ``view`` that a Flatten exported to fails; ``reshape`` is the same op
    wherever ``view`` works, and copies where it does not.
    """
    changed = False
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
            changed = True
    if changed:
        graph_module.recompile()


@torch.no_grad()
def run_fixed_batch(fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, batch: int) -> torch.Tensor:
    """``fn`` over ``inputs`` in chunks of exactly ``batch`` rows (the last one padded, the padding dropped)."""
    outputs = []
    for chunk in inputs.split(batch):
        rows = len(chunk)
        if rows < batch:
            chunk = torch.cat([chunk, chunk[:1].expand(batch - rows, *chunk.shape[1:])])
        outputs.append(fn(chunk)[:rows])
    return torch.cat(outputs)


@torch.no_grad()
def median_latencies_ms(fns: Sequence[Callable[[torch.Tensor], Any]], x: torch.Tensor, repeats: int,
                        threads: int = 1, warmup: int = 3) -> list[float]:
    """Median wall time (ms) of each of ``fns`` on ``x`` with ``threads`` CPU threads, measured interleaved.

    One thread by default: on a shared machine, multi-threaded kernels wait on
    busy cores and their timings mostly measure the neighbours.
    """
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for fn in fns:
            for _ in range(warmup):
                fn(x)
        times: list[list[float]] = [[] for _ in fns]
        for _ in range(repeats):
            for i, fn in enumerate(fns):
                start = time.perf_counter()
                fn(x)
                times[i].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(saved)
    return [1e3 * statistics.median(t) for t in times]


def quantization_check(
    model: nn.Module,
    calibration: Sequence[torch.Tensor],
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    batch: int = 256,
    repeats: int = 30,
    threads: int = 1,
) -> QuantizationResult:
    """Quantize ``model`` to int8, report its fusions, test accuracy fp32 vs int8 and CPU latency at ``batch``."""
    model = model.eval()
    example = x_test[torch.arange(batch) % len(x_test)]  # test rows, cycled when batch > the test set
    seven_bit_weights = needs_seven_bit_weights()
    _, lowered = quantize_int8(model, calibration, example, seven_bit_weights=seven_bit_weights)
    float_graph = export_graph(model, example, dynamic_batch=False).graph
    fusions = fusion_table(model, float_graph, lowered)
    with quiet_torchao(), torch.no_grad():
        logits_fp32 = model(x_test)
        logits_int8 = run_fixed_batch(lowered, x_test, batch)
        latency_fp32, latency_int8 = median_latencies_ms([model, lowered], example, repeats, threads)
    counts = op_counts(lowered.graph)
    pred_fp32, pred_int8 = logits_fp32.argmax(-1), logits_int8.argmax(-1)
    return QuantizationResult(
        fusions=fusions,
        int8_op_counts={k: v for k, v in counts.items() if k.startswith(("onednn.", "quantized_decomposed."))},
        fp32_ops_left={k: v for k, v in counts.items()
                       if not k.startswith(("onednn.", "quantized_decomposed.")) and k not in LAYOUT_OPS},
        accuracy_fp32=100.0 * float((pred_fp32 == y_test).float().mean()),
        accuracy_int8=100.0 * float((pred_int8 == y_test).float().mean()),
        agreement=100.0 * float((pred_fp32 == pred_int8).float().mean()),
        batch=batch,
        latency_fp32_ms=latency_fp32,
        latency_int8_ms=latency_int8,
        repeats=repeats,
        threads=threads,
        weight_bits=7 if seven_bit_weights else 8,
    )
