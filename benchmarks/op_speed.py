"""Speed and memory of the λ-GELU op against F.gelu, F.relu and a plain copy, on CPU (or a CUDA GPU).

For each size (64K to 16M elements) and dtype (fp32, bf16) it times, in one
run, the forward and the forward+backward of

* ``F.gelu`` (the baseline every ratio is taken against), ``F.relu`` and
  ``x.clone()`` (a copy: one read and one write, the memory-bandwidth limit);
* ``F.gelu`` compiled by ``torch.compile`` (what inductor's own code for the
  same erf formula costs, against ATen's GELU kernel), and ``lambda_gelu``
  compiled the same way (the op inside a user's ``torch.compile``: its traced
  path, whose ratio to the former is the "compiled gate" target of issue 13);
* λ-GELU on its compiled path (``torch.compile``/inductor kernels) and on its
  eager fallback (``LAMBDA_GELU_COMPILE=0``), with a learnable scalar λ (so the
  backward also reduces ∂f/∂λ);
* the plain composition ``F.gelu(λx)/λ`` (what the op replaced).

Each time is the median of ``--repeats`` timed calls after ``--warmup``
untimed ones; the variants are timed round-robin (one call of each in turn),
so that a burst of load from other jobs on the machine hits all of them alike.
The whole measurement is repeated ``--rounds`` times; each ratio reported is
the median over rounds of that round's ratio, with the range over rounds.
The backward is ``torch.autograd.grad`` with a random upstream gradient. Bytes
saved for backward per element are counted with
``torch.autograd.graph.saved_tensors_hooks``.

``--device cuda`` times the same variants on the GPU (the compiled path is then
inductor's Triton kernels; each call is followed by ``torch.cuda.synchronize``),
and the tables gain each variant's share of a copy's bandwidth (copy time ÷ its
time: the forward of a gate moves the bytes a copy moves). The accuracy table is
always measured on the CPU.

Prints Markdown tables and writes everything as JSON. ``--numerics-only``
measures only the accuracy of each path (seconds, no timing);
``--from-json FILE`` prints the tables of a saved run without measuring.

Usage: python benchmarks/op_speed.py [--out runs/op_speed.json] [--force]
       [--sizes 65536,...] [--dtypes fp32,bf16] [--repeats 15] [--warmup 3] [--rounds 3] [--threads 2]
       [--device cpu|cuda]
       [--numerics-only]
       python benchmarks/op_speed.py --from-json runs/op_speed.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from lambda_gelu import kernels
from lambda_gelu.check.runner import device_summary
from lambda_gelu.ops import lambda_gelu, lambda_gelu_reference, op_path
from lambda_gelu.outputs import check_writable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_SIZES = (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 23, 1 << 24)
LAM = 2.5


def _size_name(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 else f"{n >> 10}K"


_gelu_inductor = torch.compile(F.gelu, dynamic=True)
_lambda_gelu_inductor = torch.compile(lambda_gelu, dynamic=True)  # the op inside a user's torch.compile


def _variants(x: torch.Tensor, lam: torch.Tensor) -> dict[str, tuple[str | None, Callable[[], object]]]:
    """name → (compile mode to set first, or None; the forward call)."""
    return {
        "F.gelu": (None, lambda: F.gelu(x)),
        "F.relu": (None, lambda: F.relu(x)),
        "copy": (None, lambda: x.clone()),
        "F.gelu by inductor": (None, lambda: _gelu_inductor(x)),
        "λ-GELU by inductor": (None, lambda: _lambda_gelu_inductor(x, lam)),
        "λ-GELU compiled": ("on", lambda: lambda_gelu(x, lam)),
        "λ-GELU eager": ("off", lambda: lambda_gelu(x, lam)),
        "F.gelu(λx)/λ": (None, lambda: lambda_gelu_reference(x, lam)),
    }


def _with_backward(forward: Callable[[], torch.Tensor], inputs: list[torch.Tensor], grad: torch.Tensor):
    def step():
        out = forward()
        return torch.autograd.grad(out, inputs, grad)

    return step


def saved_bytes_per_element(forward: Callable[[], torch.Tensor], numel: int) -> float:
    """Bytes that autograd keeps for the backward pass of ``forward()``, per input element."""
    total = 0
    seen: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:  # the same storage saved twice costs once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return total / numel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_round_robin(calls: dict[str, tuple[str | None, Callable[[], object]]], warmup: int, repeats: int,
                      device: torch.device = torch.device("cpu")):
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(warmup):
        for mode, call in calls.values():
            kernels.set_compile_mode(mode)
            call()
    for _ in range(repeats):
        for name, (mode, call) in calls.items():
            kernels.set_compile_mode(mode)
            _sync(device)
            start = time.perf_counter()
            call()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    kernels.set_compile_mode(None)
    return {name: statistics.median(ts) for name, ts in times.items()}, {name: min(ts) for name, ts in times.items()}


def measure(n: int, dtype: torch.dtype, warmup: int, repeats: int, device: torch.device = torch.device("cpu")) -> dict:
    """Forward and forward+backward medians (seconds) of every variant on ``n`` elements of ``dtype``."""
    torch.manual_seed(0)
    x = torch.randn(n, dtype=dtype, device=device)
    lam = torch.tensor(LAM, device=device)
    grad = torch.randn(n, dtype=dtype, device=device)
    forward = _variants(x, lam)
    forward_times, forward_min = _time_round_robin(forward, warmup, repeats, device)

    xg = x.clone().requires_grad_(True)
    lamg = lam.clone().requires_grad_(True)
    grad_variants = _variants(xg, lamg)
    backward_calls = {}
    saved = {}
    for name, (mode, call) in grad_variants.items():
        inputs = [xg, lamg] if "λ" in name else [xg]
        backward_calls[name] = (mode, _with_backward(call, inputs, grad))
        kernels.set_compile_mode(mode)
        saved[name] = saved_bytes_per_element(call, n)
        kernels.set_compile_mode(None)
    backward_times, backward_min = _time_round_robin(backward_calls, warmup, repeats, device)
    kernels.set_compile_mode("on")
    compiled_path = op_path(x, lam)
    kernels.set_compile_mode(None)
    return {
        "numel": n,
        "dtype": str(dtype).removeprefix("torch."),
        "compiled_path_taken": compiled_path == "compiled",
        "forward_s": forward_times,
        "forward_backward_s": backward_times,
        "forward_min_s": forward_min,
        "forward_backward_min_s": backward_min,
        "saved_bytes_per_element": saved,
    }


def numerics() -> list[dict]:
    """Errors of each path against float64 ``x·Φ(λx)`` on 2M+1 fp32 points with λx in [-10, 10].

    Per λ: the max |error| over all points, and (under ``"left tail max rel"``) the max relative error over
    the points with λx <= -1, where x·Φ(λx) is small and 1 + erf(λx/√2) cancels.
    """
    x = torch.linspace(-10.0, 10.0, 2 * (1 << 20) + 1)
    rows = []
    for lam in (1.0, 2.5, 100.0):
        xs = x / lam  # the curved region |λx| <= 10
        x64 = xs.double()
        truth = x64 * 0.5 * torch.special.erfc(-lam * x64 / math.sqrt(2.0))  # Φ(z) = ½erfc(−z/√2): no cancellation
        row: dict = {"lambda": lam}
        outputs = {}
        for name, mode in (("compiled", "on"), ("fast eager", "off")):
            kernels.set_compile_mode(mode)
            assert op_path(xs, lam) == name
            outputs[name] = (lambda_gelu(xs, lam), slice(None))
        kernels.set_compile_mode(None)
        sample = slice(None, None, 40)  # 52K points: below FAST_MIN_NUMEL, so the exact path
        assert op_path(xs[sample], lam) == "exact eager"
        outputs["exact eager (erfc)"] = (lambda_gelu(xs[sample], lam), sample)
        outputs["traced (in torch.compile)"] = (_lambda_gelu_inductor(xs, torch.tensor(lam)), slice(None))
        outputs["F.gelu(λx)/λ"] = (lambda_gelu_reference(xs, torch.tensor(lam)), slice(None))
        tail = {}
        for name, (out, where) in outputs.items():
            error = out.double() - truth[where]
            row[name] = float(error.abs().max())
            left = lam * x64[where] <= -1.0
            tail[name] = float((error[left] / truth[where][left]).abs().max())
        row["left tail max rel"] = tail
        if lam == 1.0:
            row["compiled vs F.gelu"] = float((_compiled(xs) - F.gelu(xs)).abs().max())
            kernels.set_compile_mode("off")
            row["fast eager vs F.gelu"] = float((lambda_gelu(xs, 1.0) - F.gelu(xs)).abs().max())
            kernels.set_compile_mode(None)
        rows.append(row)
    return rows


def _compiled(x: torch.Tensor) -> torch.Tensor:
    kernels.set_compile_mode("on")
    try:
        return lambda_gelu(x, 1.0)
    finally:
        kernels.set_compile_mode(None)


def _numerics_table(rows: list[dict]) -> str:
    names = [k for k, v in rows[0].items() if isinstance(v, float) and k != "lambda" and "vs" not in k]
    lines = ["**Max |error| against float64 x·Φ(λx)** (fp32 inputs spanning |λx| <= 10)", ""]
    lines.append("| λ | " + " | ".join(names) + " |")
    lines.append("| ---: | " + " | ".join("---:" for _ in names) + " |")
    for row in rows:
        lines.append(f"| {row['lambda']:g} | " + " | ".join(f"{row[n]:.2e}" for n in names) + " |")
    if "left tail max rel" in rows[0]:
        tail_names = list(rows[0]["left tail max rel"])
        lines += ["", "**Max relative error in the left tail** (the same points with −10 <= λx <= −1)", ""]
        lines.append("| λ | " + " | ".join(tail_names) + " |")
        lines.append("| ---: | " + " | ".join("---:" for _ in tail_names) + " |")
        for row in rows:
            tail = row["left tail max rel"]
            lines.append(f"| {row['lambda']:g} | " + " | ".join(f"{tail[n]:.2e}" for n in tail_names) + " |")
    first = rows[0]
    lines.append("")
    lines.append(
        f"At λ = 1, max |λ-GELU − F.gelu|: compiled {first['compiled vs F.gelu']:.2e}, "
        f"fast eager {first['fast eager vs F.gelu']:.2e}."
    )
    return "\n".join(lines)


def combine_rounds(runs: list[dict]) -> dict:
    """One size and dtype measured in several rounds: each ratio is the median over rounds of that round's ratio.

    A round's medians can still be shifted by a burst of load from other jobs
    that lasts most of the round; the median over rounds discards such rounds,
    and the range over rounds shows how far they were off.
    """
    result = {k: v for k, v in runs[0].items() if not k.endswith("_s")}
    for key in ("forward_s", "forward_backward_s", "forward_min_s", "forward_backward_min_s"):
        names = list(runs[0][key])
        ratios = {name: [run[key][name] / run[key]["F.gelu"] for run in runs] for name in names}
        result[key] = {name: statistics.median(run[key][name] for run in runs) for name in names}
        result[f"{key}_ratio"] = {name: statistics.median(r) for name, r in ratios.items()}
        result[f"{key}_ratio_range"] = {name: [min(r), max(r)] for name, r in ratios.items()}
        if {"λ-GELU by inductor", "F.gelu by inductor"} <= set(names):  # the compiled-gate target (issue 13)
            gate = [run[key]["λ-GELU by inductor"] / run[key]["F.gelu by inductor"] for run in runs]
            result[f"{key}_{INDUCTOR_RATIO}"] = [statistics.median(gate), min(gate), max(gate)]
    result["rounds"] = runs
    return result


INDUCTOR_RATIO = "λ-GELU by inductor ÷ F.gelu by inductor"
COPY_SHARE = "λ-GELU compiled: share of a copy's bandwidth"


def _table(results: list[dict], key: str, title: str) -> str:
    names = list(results[0][key])
    gate = f"{key}_{INDUCTOR_RATIO}"
    extra = [INDUCTOR_RATIO] if gate in results[0] else []
    copy_share = key == "forward_s" and "copy" in names and "λ-GELU compiled" in names
    if copy_share:
        extra.append(COPY_SHARE)
    lines = [f"**{title}** (time ÷ F.gelu's, median over rounds; F.gelu's own median time in ms)", ""]
    lines.append("| size | dtype | F.gelu ms | " + " | ".join([n for n in names if n != "F.gelu"] + extra) + " |")
    lines.append("| --- | --- | ---: | " + " | ".join("---:" for n in [*names[1:], *extra]) + " |")
    for r in results:
        ratio, spread = r[f"{key}_ratio"], r[f"{key}_ratio_range"]
        many = len(r["rounds"]) > 1
        cells = [f"{ratio[n]:.2f}" + (f" ({spread[n][0]:.2f}–{spread[n][1]:.2f})" if many else "")
                 for n in names if n != "F.gelu"]
        if gate in r:
            median, low, high = r[gate]
            cells.append(f"**{median:.2f}**" + (f" ({low:.2f}–{high:.2f})" if many else ""))
        if copy_share:
            cells.append(f"{ratio['copy'] / ratio['λ-GELU compiled']:.0%}")
        lines.append(
            f"| {_size_name(r['numel'])} | {r['dtype']} | {r[key]['F.gelu'] * 1e3:.2f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def _saved_table(results: list[dict]) -> str:
    names = list(results[0]["saved_bytes_per_element"])
    lines = ["**Bytes saved for backward per element** (largest size)", ""]
    lines.append("| dtype | " + " | ".join(names) + " |")
    lines.append("| --- | " + " | ".join("---:" for _ in names) + " |")
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        r = max((r for r in results if r["dtype"] == dtype), key=lambda r: r["numel"])
        lines.append(f"| {dtype} | " + " | ".join(f"{r['saved_bytes_per_element'][n]:.2f}" for n in names) + " |")
    return "\n".join(lines)


def tables_from_report(report: dict) -> str:
    """The Markdown tables of a saved report (a full run, or a ``--numerics-only`` one)."""
    parts = []
    if report.get("results"):
        results = report["results"]
        parts += [
            _table(results, "forward_s", "Forward"),
            _table(results, "forward_backward_s", "Forward + backward"),
            _saved_table(results),
        ]
    if report.get("numerics"):
        parts.append(_numerics_table(report["numerics"]))
    return "\n\n".join(parts)


def _header(report: dict) -> str:
    line = f"command: {report['command']} (torch {report['torch']}, {report.get('machine', 'CPU not recorded')}"
    if report.get("device", "cpu") != "cpu":
        line += f", {report['device']}"
    line += f", {report['threads']} threads"
    if report.get("results"):
        line += f", {report['rounds']} rounds × {report['repeats']} repeats after {report['warmup']} warm-up"
    if report.get("first_compile_s") is not None:
        line += f"; first compile {report['first_compile_s']:.1f} s"
    return line + ")"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-json", metavar="FILE", help="print the tables of a saved run; measure nothing")
    parser.add_argument("--numerics-only", action="store_true", help="measure only the accuracy table (seconds)")
    parser.add_argument("--out", default="runs/op_speed.json")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)))
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="independent rounds per size (ratios: median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not args.from_json and not torch.cuda.is_available():
        parser.error("--device cuda: this machine has no CUDA GPU that torch can use")
    command = " ".join(["python", "benchmarks/op_speed.py", *(sys.argv[1:] if argv is None else argv)])
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        print(_header(report))
        print()
        print(tables_from_report(report))
        return
    out = check_writable(args.out, args.force)
    torch.set_num_threads(args.threads)
    if args.numerics_only:
        report = {"command": command, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "machine": device_summary(), "numerics": numerics(),
                  "compile_status": kernels.compile_status()}
        print(tables_from_report(report))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"\nwrote {out}")
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    device = torch.device(args.device)

    started = time.perf_counter()
    kernels.set_compile_mode("on")
    warm = torch.randn(1 << 16, device=device)  # compile (or load from cache) before timing
    for dtype in dtypes:
        w = warm.to(dtype).requires_grad_(True)
        lam = torch.tensor(LAM, requires_grad=True, device=device)
        torch.autograd.grad(lambda_gelu(w, lam), [w, lam], torch.ones_like(w))
    kernels.set_compile_mode(None)
    compile_s = time.perf_counter() - started

    accuracy = numerics()
    runs: dict[tuple[torch.dtype, int], list[dict]] = {(dtype, n): [] for dtype in dtypes for n in sizes}
    for round_index in range(args.rounds):  # rounds outermost: a burst of load hits one round of each size
        for dtype, n in runs:
            runs[(dtype, n)].append(measure(n, dtype, args.warmup, args.repeats, device))
        print(f"round {round_index + 1} of {args.rounds} measured", flush=True)
    results = [combine_rounds(rounds) for rounds in runs.values()]

    report = {
        "command": command,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": device_summary(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "compile_status": kernels.compile_status(),
        "first_compile_s": compile_s,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "lambda": LAM,
        "results": results,
        "numerics": accuracy,
    }
    tables = tables_from_report(report)
    print(f"first compile (forward + backward, {args.dtypes}): {compile_s:.1f} s")
    print()
    print(tables)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
