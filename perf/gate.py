"""The correctness gate of the step benchmarks: a configuration's step 0 (fixed seed: same initial
weights and the same draws in every configuration, irepa.train.assemble) against the eager step's,
at bf16 tolerance: the loss, the total gradient norm, and each parameter's gradient norm (a wrong
attention or adaLN kernel moves its own weights' gradients long before it moves the loss). The
eager reference's per-parameter norms are kept in a JSON file (beside its CSV by default,
`<csv>.grads.json`; the GPU call keeps it out of OUT). A row that
fails is marked `FAIL ...` in its `gate` column and is never counted as a speed result
(perf/suite_report.py)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

# bf16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); a compiled or fused step reorders
# reductions over a whole batch, so its loss may move by a few of those steps and its gradient
# norm, a sum of squares over every parameter, by a few more.
LOSS_RTOL = 2e-2
GRAD_RTOL = 5e-2
TENSOR_RTOL = 1e-1  # one parameter's gradient: a smaller reduction, so a larger bf16 spread
TENSOR_FLOOR = 1e-3  # of the largest reference norm: below it a gradient is rounding noise
NOT_COMPARABLE = "n/a (reference-style step: other projector, precision and encoder)"


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def tensor_diff(norms: dict[str, float], ref: dict[str, float]) -> tuple[float, str]:
    """(largest relative difference of a parameter's gradient norm from the reference's, its name);
    a parameter of the reference with no gradient here counts as infinitely far."""
    floor = TENSOR_FLOOR * max(ref.values(), default=0.0)
    worst, name = 0.0, ""
    for k, b in ref.items():
        a = norms.get(k)
        d = math.inf if a is None or not math.isfinite(a) else abs(a - b) / max(abs(b), floor, 1e-30)
        if d > worst:
            worst, name = d, k
    return worst, name


def verdict(loss: float, grad_norm: float, ref_loss: float | None, ref_grad: float | None,
            tensors: tuple[float, str] | None = None) -> str:
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return f"FAIL (non-finite: loss {loss}, grad norm {grad_norm})"
    if ref_loss is None or ref_grad is None:
        return "no reference"
    dl, dg = _rel(loss, ref_loss), _rel(grad_norm, ref_grad)
    ok = dl <= LOSS_RTOL and dg <= GRAD_RTOL
    text = f"loss {dl:.1e}, grad norm {dg:.1e}"
    if tensors is not None:
        ok = ok and tensors[0] <= TENSOR_RTOL
        text += f", worst parameter {tensors[0]:.1e} ({tensors[1]})"
    return f"{'pass' if ok else 'FAIL'} ({text} from eager)"


def fingerprint_path(csv_path) -> Path:
    return Path(str(csv_path) + ".grads.json")


def save_fingerprint(path, model: str, batch, norms: dict[str, float]) -> None:
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[f"{model}|{batch}"] = norms
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def load_fingerprint(path, model: str, batch) -> dict[str, float] | None:
    path = Path(path)
    return json.loads(path.read_text()).get(f"{model}|{batch}") if path.is_file() else None


def reference(rows: list[dict], model: str, batch) -> dict | None:
    """The newest eager reference row of `model` at `batch` (gate 'ref') among rows."""
    refs = [r for r in rows if r.get("model") == model and str(r.get("batch")) == str(batch)
            and r.get("gate") == "ref" and r.get("loss0") not in (None, "")]
    return refs[-1] if refs else None


def gate_row(row: dict, ref: dict | None, norms: dict | None = None, ref_norms: dict | None = None) -> str:
    """The gate column of a step row with loss0 / grad_norm0 filled in; norms: its per-parameter
    gradient norms, ref_norms the reference's (compared where both are given)."""
    if row["config"] == "baseline":
        return NOT_COMPARABLE
    if ref is None and row["config"] == "eager":
        return "ref"
    tensors = tensor_diff(norms, ref_norms) if norms is not None and ref_norms else None
    return verdict(float(row["loss0"]), float(row["grad_norm0"]), float(ref["loss0"]) if ref else None,
                   float(ref["grad_norm0"]) if ref else None, tensors)


def counted(row: dict) -> bool:
    """A speed figure may use this row: it did not fail the gate (rows from before the gate count)."""
    return not str(row.get("gate", "")).startswith("FAIL")
