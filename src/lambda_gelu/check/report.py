"""The check report as Markdown, rendered from the JSON-ready dict that ``run_check`` returns."""

from __future__ import annotations

from typing import Any

from lambda_gelu.check.quantize import GATE_NAMES


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} × {n}" for name, n in counts.items()) or "none"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(["---"] * len(header)) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _side_by_side(report: dict[str, Any], section: dict[str, Any],
                  rows: list[tuple[str, Any]]) -> str:
    """A table with one column per model; each row is (label, fn(model entry) -> str)."""
    keys = list(report["models"])
    header = ["", *(report["models"][k]["title"] for k in keys)]
    body = []
    for label, fn in rows:
        cells = []
        for key in keys:
            entry = section["models"].get(key, {})
            if "error" in entry:
                cells.append(f"error: {entry['error']}")
            elif "skipped" in entry and "accepted" not in entry:
                cells.append(f"skipped: {entry['skipped']}")
            else:
                cells.append(fn(entry))
        body.append([label, *cells])
    return _table(header, body)


def _models_md(report: dict[str, Any]) -> str:
    keys = list(report["models"])
    models = report["models"]
    rows = [
        ["checkpoint", *(f"`{models[k]['source']}`" for k in keys)],
        ["gates", *(_counts({GATE_NAMES.get(g, g): n for g, n in models[k]["gates"].items()}) for k in keys)],
        ["test accuracy (fp32)", *(f"{models[k]['test_accuracy']:.2f}%" for k in keys)],
        ["test loss", *(f"{models[k]['test_loss']:.4f}" for k in keys)],
    ]
    return _table(["", *(models[k]["title"] for k in keys)], rows)


def _onnx_md(report: dict[str, Any]) -> str:
    section = report["onnx"]
    if section["status"] != "ok":
        return section["status"]
    smooth = "/".join(section["smooth_gate_ops"])
    table = _side_by_side(report, section, [
        ("file", lambda e: f"`{e['path']}`"),
        ("op census", lambda e: _counts(e["op_counts"])),
        (f"smooth-gate ops ({smooth})", lambda e: ", ".join(e["smooth_gate_ops"]) or "none"),
        ("max \\|onnxruntime − PyTorch\\| on the test set", lambda e: f"{e['max_abs_diff']:.2e}"),
        ("parity (<= 1e-4)", lambda e: "yes" if e["parity_ok"] else "**no**"),
    ])
    return f"Opset {section['opset']}, torch.onnx dynamo exporter (onnxscript); onnxruntime CPU.\n\n{table}"


def _fused(entry: dict[str, Any]) -> str:
    gated = [row for row in entry["fusions"] if row["gate"]]
    fused = [row for row in gated if row["gate_fused"]]
    return f"{len(fused)} / {len(gated)}"


def _patterns(entry: dict[str, Any]) -> str:
    seen: dict[str, list[int]] = {}
    for row in entry["fusions"]:
        if row["gate"]:
            seen.setdefault(row["pattern"], [0, 0])
            seen[row["pattern"]][0] += row["gate_fused"]
            seen[row["pattern"]][1] += 1
    return ", ".join(f"{p}: {f}/{n} fused" for p, (f, n) in seen.items()) or "no gated Linear/Conv"


def _quant_md(report: dict[str, Any]) -> str:
    section = report["quantization"]
    if section["status"] != "ok":
        return section["status"]
    first = next((e for e in section["models"].values() if "batch" in e), None)
    latency = "latency" if first is None else (
        f"CPU latency, batch {first['batch']}, {first['threads']} thread, median of {first['repeats']}")
    table = _side_by_side(report, section, [
        ("Linear/Conv layers run as int8 kernels", _quantized),
        ("int8 kernels and (de)quantize ops", lambda e: _counts(e["int8_op_counts"])),
        ("gates fused into an int8 kernel", _fused),
        ("patterns", _patterns),
        ("fp32 ops left in the int8 graph", lambda e: _counts(e["fp32_ops_left"])),
        ("test accuracy fp32 → int8", lambda e: f"{e['accuracy_fp32']:.2f}% → {e['accuracy_int8']:.2f}%"),
        ("same prediction fp32 / int8", lambda e: f"{e['agreement']:.2f}%"),
        (f"{latency}: fp32 / int8",
         lambda e: f"{e['latency_fp32_ms']:.3f} ms / {e['latency_int8_ms']:.3f} ms (int8 ×{e['speedup']:.2f})"),
    ])
    rows = []
    for key, entry in section["models"].items():
        for row in entry.get("fusions", []):
            rows.append([
                report["models"][key]["title"], f"`{row['compute']}`", row["pattern"],
                _kernel(row), row["post_op"] or "–",
                "–" if row["batch_norm_folded"] is None else ("yes" if row["batch_norm_folded"] else "**no**"),
                "–" if not row["gate"] else ("yes" if row["gate_fused"] else "no"),
                _counts(_tally(row["gate_ops_left"])) if row["gate_ops_left"] else "–",
            ])
    detail = _table(["model", "module", "fp32 pattern", "int8 kernel", "post-op", "BN folded", "gate fused",
                     "gate runs as (fp32)"], rows)
    return f"Route: {section['route']}.\n\n{table}\n\nPer Linear/Conv:\n\n{detail}"


def _kernel(row: dict[str, Any]) -> str:
    if row["quantized"] is None:
        return "not matched"
    return row["int8_op"] if row["quantized"] else "stays fp32"


def _quantized(entry: dict[str, Any]) -> str:
    rows = entry["fusions"]
    if any(row["quantized"] is None for row in rows):
        return "graphs not matched"
    return f"{sum(bool(row['quantized']) for row in rows)} / {len(rows)}"


def _tally(ops: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def _verdicts(entry: dict[str, Any]) -> str:
    if not entry["accepted"]:
        return "–"
    if entry.get("skipped"):
        return f"accepted; {entry['skipped']}"
    c = entry["counts"]
    text = f"{c['verified']} / {c['falsified']} / {c['timeout']}"
    extra = [f"{c[k]} {k}" for k in ("misclassified", "error") if c[k]]
    return text + (f" ({', '.join(extra)})" if extra else "")


def _counterexamples(entry: dict[str, Any]) -> str:
    found = [p for p in entry.get("points", []) if p["status"] == "falsified"]
    if not entry["accepted"] or not found:
        return "–"
    confirmed = sum(bool(p["counterexample_confirmed"]) for p in found)
    return f"{confirmed} / {len(found)} confirmed by PyTorch"


def _verify_md(report: dict[str, Any]) -> str:
    section = report["verification"]
    if section["status"] != "ok":
        return section["status"]
    table = _side_by_side(report, section, [
        ("accepted by the verifier", lambda e: "yes" if e["accepted"] else
         f"**no**: `{e['rejection']}` ({e['rejected_at']})"),
        ("ONNX ops without a Marabou encoding", lambda e: ", ".join(e["unsupported_ops"]) or "none"),
        ("points verified / falsified / timeout", _verdicts),
        ("counterexamples", _counterexamples),
        ("verifier time", lambda e: f"{e['seconds']:.1f} s" if e["accepted"] else "–"),
    ])
    lo, hi = section["domain"]
    return (f"{section['verifier']}: for each of the first {section['points']} test points and each other class, "
            f"is there an input within L∞ ε = {section['epsilon']:g} (clipped to the training data's range "
            f"[{lo:g}, {hi:g}]) where that class's logit >= the true class's? Per-query timeout "
            f"{section['timeout_s']:g} s.\n\n{table}")


def _sparsity_md(report: dict[str, Any]) -> str:
    section = report["sparsity"]
    rows = []
    for key, entry in section["models"].items():
        for gate in entry["gates"]:
            kind = GATE_NAMES.get(gate["kind"], gate["kind"])
            rows.append([report["models"][key]["title"], f"`{gate['name']}`", kind,
                         f"{100 * gate['exact_zero']:.1f}%", f"{100 * gate['near_zero']:.1f}%",
                         f"{100 * gate['negative_input']:.1f}%",
                         f"{gate['dead_units']} / {gate['units']}"])
    table = _table(["model", "gate", "kind", "exact zeros", "\\|y\\| < 1e-6", "inputs < 0", "units never active"],
                   rows)
    return ("Gate outputs on the test set that are zero; \"inputs < 0\" is the share a ReLU in that place would "
            f"zero.\n\n{table}")


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown (from ``run_check``'s dict)."""
    command = report.get("command") or "lambda_gelu.check.run_check(...)"
    v = report["versions"]
    return f"""# lambda-gelu check

Data set: **{report['dataset']}** ({report['test_examples']} test examples).

{_models_md(report)}

## ONNX

{_onnx_md(report)}

## int8 post-training quantization

{_quant_md(report)}

## Formal verification

{_verify_md(report)}

## Activation sparsity

{_sparsity_md(report)}

Command: `{command}`.
Made in {report['seconds']} s on {report['cpu']} with lambda-gelu {v['lambda_gelu']}, torch {v['torch']},
onnx {v['onnx']}, onnxruntime {v['onnxruntime']}, onnxscript {v['onnxscript']}, torchao {v['torchao']},
maraboupy {v['maraboupy']}.
"""
