"""Whole training steps (forward + backward + AdamW step) of an MLP, a ViT and a char-level GPT: GELU vs λ-GELU vs
ReLU, with the model run eagerly and compiled by its user (``torch.compile(model)``).

The models: ``nn.Sequential`` 256-1024-1024-10 with batch 2048 (the MLP of issue 13),
and the library's own ``build_model("vit")`` and ``build_model("gpt")``; every
gate sees about 2M elements per step (above the op's compile threshold).
λ-GELU is set up as a user would: the GELU model is converted with
``lambda_gelu.convert`` (a learnable λ per layer) and trained with
``AdamW(lambda_gelu.param_groups(...))``, which adds the hardness group and its
normalized update; the GELU and ReLU models use the same ``param_groups`` call
(no hardness group). The optimizer step runs eagerly in every variant.

Variants (``--variants`` picks some; the ratio of each is taken against the
GELU model run the same way):

* ``GELU``, ``ReLU``: eager models.
* ``λ-GELU compiled``: eager model, the op on its own compiled kernels (``LAMBDA_GELU_COMPILE=1``;
  what ``auto`` picks at these sizes).
* ``λ-GELU eager``: eager model, the op's eager fallback (``LAMBDA_GELU_COMPILE=0``).
* ``GELU (model compiled)``, ``λ-GELU (model compiled)``, ``ReLU (model compiled)``: the model
  compiled by ``torch.compile(model)`` (inductor), as its user would; the op's
  own kernels stand aside and inductor fuses its formulas into the model's graph.

``--dtype bf16`` runs forward and loss under ``torch.autocast("cpu", torch.bfloat16)``
(weights and optimizer in fp32), as a user training in bf16 would.

After ``--warmup`` steps of each (which also compile), the variants are timed
round-robin (one step of each in turn), ``--repeats`` steps per round; each
ratio is the median over ``--rounds`` rounds of the ratio of that round's median
step times, reported with its range over the rounds.

Usage: python benchmarks/train_step_speed.py [--out runs/train_step_speed.json] [--force]
       [--models mlp,vit,gpt] [--variants NAME,...] [--dtype fp32|bf16]
       [--repeats 5] [--rounds 4] [--warmup 3] [--threads 2] [--profile]
       python benchmarks/train_step_speed.py --from-json runs/train_step_speed.json   (tables only, no measuring)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lambda_gelu as lg
from lambda_gelu import kernels
from lambda_gelu.check.runner import device_summary
from lambda_gelu.models import build_model
from lambda_gelu.outputs import check_writable

MLP_WIDTHS = (256, 1024, 1024, 10)
MLP_BATCH = 2048  # 2048 × 1024 = 2.1M elements per gate
VIT = dict(num_classes=10, image_size=32, patch_size=4, in_channels=3, dim=128, depth=4, heads=4, mlp_ratio=4.0)
VIT_BATCH = 64  # 65 tokens × 512 hidden × 64 = 2.1M elements per gate
GPT = dict(vocab_size=65, block_size=128, n_layer=4, n_head=4, n_embd=128, mlp_ratio=4.0)
GPT_BATCH = 32  # 128 tokens × 512 hidden × 32 = 2.1M elements per gate
MODELS = ("mlp", "vit", "gpt")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def make_model(kind: str, activation: str) -> nn.Module:
    """The MLP, ViT or GPT with ``activation`` ("gelu", "relu", or "lambda_gelu" by converting the GELU model)."""
    torch.manual_seed(0)
    base = "relu" if activation == "relu" else "gelu"
    if kind == "mlp":
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(MLP_WIDTHS, MLP_WIDTHS[1:])):
            layers.append(nn.Linear(w_in, w_out))
            if i < len(MLP_WIDTHS) - 2:
                layers.append(nn.ReLU() if base == "relu" else nn.GELU())
        model: nn.Module = nn.Sequential(*layers)
    else:
        model = build_model(kind, activation=base, **(VIT if kind == "vit" else GPT))
    if activation == "lambda_gelu":
        lg.convert(model, init=2.0)  # one learnable λ per layer
    return model.train()


def make_batch(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    if kind == "mlp":
        x = torch.randn(MLP_BATCH, MLP_WIDTHS[0], generator=generator)
        return x, torch.randint(0, MLP_WIDTHS[-1], (MLP_BATCH,), generator=generator)
    if kind == "vit":
        x = torch.randn(VIT_BATCH, 3, 32, 32, generator=generator)
        return x, torch.randint(0, 10, (VIT_BATCH,), generator=generator)
    idx = torch.randint(0, GPT["vocab_size"], (GPT_BATCH, GPT["block_size"] + 1), generator=generator)
    return idx[:, :-1], idx[:, 1:]


def make_step(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], compile_model: bool = False,
    autocast: torch.dtype | None = None,
) -> Callable[[], float]:
    """One training step of ``model`` (compiled first if asked; under CPU autocast to ``autocast`` if given)."""
    optimizer = torch.optim.AdamW(lg.param_groups(model, lr=3e-4, weight_decay=0.05))
    forward = torch.compile(model) if compile_model else model
    x, y = batch

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        cast = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
        with cast:
            logits = forward(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


VARIANTS: dict[str, tuple[str, str | None, bool]] = {
    # name → (activation, compile mode for the λ-GELU op, torch.compile the model)
    "GELU": ("gelu", None, False),
    "λ-GELU compiled": ("lambda_gelu", "on", False),
    "λ-GELU eager": ("lambda_gelu", "off", False),
    "ReLU": ("relu", None, False),
    "GELU (model compiled)": ("gelu", None, True),
    "λ-GELU (model compiled)": ("lambda_gelu", None, True),
    "ReLU (model compiled)": ("relu", None, True),
}


def baseline(name: str) -> str:
    """The variant a variant's ratio is taken against: the GELU model run the same way (eager or compiled)."""
    return "GELU (model compiled)" if name.endswith("(model compiled)") else "GELU"


def measure(kind: str, names: list[str], warmup: int, repeats: int, rounds: int,
            autocast: torch.dtype | None = None) -> dict:
    """Step times of the ``names`` variants: ``rounds`` rounds of ``repeats`` round-robin steps each, after ``warmup``."""
    batch = make_batch(kind)
    steps = {}
    for name in names:
        activation, mode, compile_model = VARIANTS[name]
        steps[name] = (mode, make_step(make_model(kind, activation), batch, compile_model, autocast))
    torch._dynamo.reset()
    for _ in range(warmup):
        for mode, step in steps.values():
            kernels.set_compile_mode(mode)
            step()
    times: list[dict[str, list[float]]] = []
    for _ in range(rounds):
        times.append({name: [] for name in steps})
        for _ in range(repeats):
            for name, (mode, step) in steps.items():
                kernels.set_compile_mode(mode)
                start = time.perf_counter()
                step()
                times[-1][name].append(time.perf_counter() - start)
    kernels.set_compile_mode(None)
    ratios = {
        name: [statistics.median(r[name]) / statistics.median(r[baseline(name)]) for r in times] for name in steps
    }
    if "GELU" in steps and "GELU (model compiled)" in steps:  # what compiling the GELU model itself gains
        ratios["GELU (model compiled) ÷ eager GELU"] = [
            statistics.median(r["GELU (model compiled)"]) / statistics.median(r["GELU"]) for r in times
        ]
    model = make_model(kind, "gelu")
    gate_numel = []
    hooks = [m.register_forward_hook(lambda _m, inp, _o: gate_numel.append(inp[0].numel()))
             for m in model.modules() if isinstance(m, nn.GELU)]
    with torch.no_grad():
        model(batch[0])
    for hook in hooks:
        hook.remove()
    return {
        "model": kind,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gates": len(gate_numel),
        "elements_per_gate": gate_numel[0] if gate_numel else 0,
        "step_s": {name: statistics.median(t for r in times for t in r[name]) for name in steps},
        "ratio": {name: statistics.median(r) for name, r in ratios.items()},
        "ratio_range": {name: [min(r), max(r)] for name, r in ratios.items()},
        "step_s_all": times,
    }


def gate_profile(kind: str, steps: int = 3) -> dict[str, float]:
    """Per-step time (ms) that torch.profiler attributes to the gates and to the whole step, GELU vs λ-GELU compiled.

    Gate time: ``aten::gelu`` + ``aten::gelu_backward`` for GELU; the compiled
    forward and backward graphs (``CompiledFxGraph``) for λ-GELU, which are the
    only compiled graphs in these models.
    """
    batch = make_batch(kind)
    profile: dict[str, float] = {}
    for name, activation, mode in (("GELU", "gelu", None), ("λ-GELU compiled", "lambda_gelu", "on")):
        kernels.set_compile_mode(mode)
        step = make_step(make_model(kind, activation), batch)
        for _ in range(2):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step()
        gate_us = sum(
            e.self_cpu_time_total for e in prof.key_averages()
            if e.key in ("aten::gelu", "aten::gelu_backward") or "CompiledFxGraph" in e.key
        )
        total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
        profile[f"{name} gates ms/step"] = gate_us / steps / 1e3
        profile[f"{name} step ms (profiled)"] = total_us / steps / 1e3
    kernels.set_compile_mode(None)
    return profile


def _ratio_cell(r: dict, name: str) -> str:
    if name not in r["ratio"]:
        return "—"
    low, high = r["ratio_range"][name]
    return f"{r['ratio'][name]:.3f} ({low:.2f}–{high:.2f})"


def tables(results: list[dict]) -> str:
    """The Markdown tables of measured (or saved) results: step ratios (eager models, then compiled models), and
    the gate profile where present. Reads files of earlier versions (eager variants only) too."""
    lines: list[str] = []
    for label_base, names in (("GELU", ["λ-GELU compiled", "λ-GELU eager", "ReLU"]),
                              ("GELU (model compiled)", ["λ-GELU (model compiled)", "ReLU (model compiled)",
                                                       "GELU (model compiled) ÷ eager GELU"])):
        shown = [n for n in names if any(n in r["ratio"] for r in results)]
        if not any(label_base in r["step_s"] for r in results) or not shown:
            continue
        if lines:
            lines.append("")
        header = [n if n.endswith("eager GELU") else f"{n} ÷ {label_base}" for n in shown]
        lines.append(f"| model | {label_base} step ms | " + " | ".join(header) + " |")
        lines.append("| --- | ---: | " + " | ".join("---:" for _ in shown) + " |")
        for r in results:
            if label_base not in r["step_s"]:
                continue
            label = (f"{r['model']} ({r['parameters'] / 1e6:.2f}M params, {r['gates']} gates × "
                     f"{r['elements_per_gate'] / 1e6:.2f}M elements)")
            cells = [_ratio_cell(r, n) for n in shown]
            lines.append(f"| {label} | {r['step_s'][label_base] * 1e3:.0f} | " + " | ".join(cells) + " |")
    if all("profile" in r for r in results):
        lines += ["", "| model | GELU gates ms/step | λ-GELU gates ms/step | GELU step ms (profiled) "
                      "| gates' extra ÷ step |", "| --- | ---: | ---: | ---: | ---: |"]
        for r in results:
            p = r["profile"]
            extra = (p["λ-GELU compiled gates ms/step"] - p["GELU gates ms/step"]) / p["GELU step ms (profiled)"]
            lines.append(f"| {r['model']} | {p['GELU gates ms/step']:.1f} | {p['λ-GELU compiled gates ms/step']:.1f} | "
                         f"{p['GELU step ms (profiled)']:.0f} | {extra:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from-json", metavar="FILE", help="print the tables of a saved run; measure nothing")
    parser.add_argument("--out", default="runs/train_step_speed.json")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated variant names (each with its baseline); default: all")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="bf16: forward and loss under CPU autocast")
    parser.add_argument("--repeats", type=int, default=5, help="round-robin steps per round")
    parser.add_argument("--rounds", type=int, default=4, help="ratio: median over rounds of each round's ratio")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", action="store_true", help="also attribute step time to the gates (profiler)")
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(f"command: {saved['command']} (torch {saved['torch']}, {saved.get('machine', 'CPU not recorded')}, "
              f"{saved['threads']} threads, "
              f"{saved['rounds']} rounds × {saved['repeats']} steps after {saved['warmup']} warm-up)")
        print()
        print(tables(saved["results"]))
        return
    models = args.models.split(",")
    names = [n.strip() for n in args.variants.split(",")]
    unknown = [m for m in models if m not in MODELS] + [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown model or variant: {', '.join(unknown)} (variants: {', '.join(VARIANTS)})")
    names = [n for n in VARIANTS if n in names or any(baseline(m) == n for m in names)]
    out = check_writable(args.out, args.force)
    torch.set_num_threads(args.threads)

    results = []
    for kind in models:
        results.append(measure(kind, names, args.warmup, args.repeats, args.rounds, DTYPES[args.dtype]))
        if args.profile:
            results[-1]["profile"] = gate_profile(kind)
        print(f"measured {kind}", flush=True)

    print()
    print(tables(results))
    report = {
        "command": " ".join(["python", "benchmarks/train_step_speed.py", *(sys.argv[1:] if argv is None else argv)]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": device_summary(),
        "compile_status": kernels.compile_status(),
        "repeats": args.repeats,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "dtype": args.dtype,
        "variants": names,
        "mlp": {"widths": list(MLP_WIDTHS), "batch": MLP_BATCH},
        "vit": VIT | {"batch": VIT_BATCH},
        "gpt": GPT | {"batch": GPT_BATCH},
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
