"""Fit the performance model's free constants on one named source of published rows; score the
rest as held out.

    python scripts/fit_published.py [--fit-source NIM] [--write] [--json out.json]

The GPU profiles' published figures (peaks, bandwidths, capacities) are cited in their files.
Two constants have no source and no measurement on these GPUs; they are the free constants:

  float8_ratio      the 8-bit matmul efficiency curve of h100 / h200 as a fraction of the
                    16-bit (`default`) curve, at every point (8-bit peak is 2x the 16-bit one;
                    tuned kernels reach less of it). Also used for int8.
  layer_overhead_s  device time per decoder layer and step that no roofline accounts for
                    (kernel launch, ramp-up, tail), on h100, h200 and a100-80gb.

They are fitted on the rows of ONE source (the fit set, `--fit-source`; NIM by default: its six
rows are the only ones that exercise both constants on one engine, a compute-bound FP8 prefill
and small-batch FP8 decodes); every other row is held out and never evaluated during the fit.
The objective is the sum of squared log errors over the fit rows; the search is coordinate
descent with golden-section steps in fixed bounds, so the result is a pure function of the fit
rows. `--write` writes the fitted values into the profile YAMLs (with the rows they came from).
Nothing here needs jax or a device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Callable

from jaxserve.bench import validate_published as vp
from jaxserve.perf.profiles import HARDWARE_DIR, Hardware, load_hardware

FIT_SOURCE = "NIM"
# which profiles each constant sets
EIGHT_BIT_PROFILES = ("h100", "h200")
OVERHEAD_PROFILES = ("h100", "h200", "a100-80gb")
BOUNDS = {"float8_ratio": (0.25, 1.0), "layer_overhead_s": (0.0, 150e-6)}
GOLDEN = (math.sqrt(5) - 1) / 2
COMMAND = "python scripts/fit_published.py --write"


@dataclasses.dataclass(frozen=True)
class Constants:
    float8_ratio: float
    layer_overhead_s: float


def split(rows: list[vp.PublishedRow], fit_source: str = FIT_SOURCE):
    """(fit rows, held-out rows): the fit rows are exactly those of `fit_source`."""
    if fit_source not in vp.SOURCES:
        raise ValueError(f"--fit-source must be one of {', '.join(vp.SOURCES)}, got "
                         f"{fit_source!r}")
    fit = [r for r in rows if r.source == fit_source]
    return fit, [r for r in rows if r.source != fit_source]


def row_span(rows: list[vp.PublishedRow]) -> str:
    """'17-22', or '1-16, 26-28' for rows in several runs."""
    numbers, runs = sorted(r.number for r in rows), []
    for n in numbers:
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def with_constants(c: Constants, base: dict[str, Hardware] | None = None) -> dict[str, Hardware]:
    """The GPU profiles with these constants in place of their own."""
    base = base or {n: load_hardware(n) for n in sorted({*EIGHT_BIT_PROFILES,
                                                         *OVERHEAD_PROFILES})}
    out = {}
    for name, hw in base.items():
        curves = dict(hw.matmul_efficiency)
        if name in EIGHT_BIT_PROFILES:
            eight = {w: tuple((r, round(c.float8_ratio * f, 4)) for r, f in curve)
                     for w, curve in hw.matmul_efficiency["default"].items()}
            curves["float8"] = curves["int8"] = eight
        overhead = c.layer_overhead_s if name in OVERHEAD_PROFILES else hw.layer_overhead_s
        out[name] = dataclasses.replace(hw, matmul_efficiency=curves, layer_overhead_s=overhead)
    return out


def loss(rows: list[vp.PublishedRow], c: Constants,
         predict: Callable = vp.predict) -> float:
    profiles = with_constants(c)
    return sum(math.log(predict(r, profiles) / r.published) ** 2 for r in rows)


def _golden(f: Callable[[float], float], lo: float, hi: float, steps: int) -> float:
    a, b = lo, hi
    x1, x2 = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
    f1, f2 = f(x1), f(x2)
    for _ in range(steps):
        if f1 <= f2:
            b, x2, f2 = x2, x1, f1
            x1 = b - GOLDEN * (b - a)
            f1 = f(x1)
        else:
            a, x1, f1 = x1, x2, f2
            x2 = a + GOLDEN * (b - a)
            f2 = f(x2)
    return (a + b) / 2


def fit(rows: list[vp.PublishedRow], sweeps: int = 3, steps: int = 14,
        predict: Callable = vp.predict) -> Constants:
    """The constants that minimise the squared log error over `rows` (only these rows are
    predicted), by `sweeps` rounds of a golden-section search per constant in BOUNDS."""
    c = Constants(float8_ratio=0.5, layer_overhead_s=0.0)
    for _ in range(sweeps):
        for name, (lo, hi) in BOUNDS.items():
            best = _golden(lambda x: loss(rows, dataclasses.replace(c, **{name: x}), predict),
                           lo, hi, steps)
            c = dataclasses.replace(c, **{name: best})
    return Constants(round(c.float8_ratio, 3), round(c.layer_overhead_s, 7))


def write_profiles(c: Constants, fit_rows: list[vp.PublishedRow],
                   directory: Path = HARDWARE_DIR) -> list[Path]:
    """Put the fitted constants into the profile YAMLs, each line saying where it came from;
    the rest of each file (its comments and cited figures) is kept."""
    where = (f"fitted on published rows {row_span(fit_rows)} ({fit_rows[0].source}) by "
             f"`{COMMAND}`")
    written = []
    for name in sorted({*EIGHT_BIT_PROFILES, *OVERHEAD_PROFILES}):
        path = directory / f"{name}.yaml"
        text = path.read_text()
        if name in OVERHEAD_PROFILES:
            text, n = re.subn(r"(?m)^layer_overhead_s:.*$",
                              f"layer_overhead_s: {c.layer_overhead_s:.3e}  # {where}", text)
            if n != 1:
                raise ValueError(f"{path}: expected one layer_overhead_s line, found {n}")
        if name in EIGHT_BIT_PROFILES:
            hw = with_constants(c, {name: load_hardware(path)})[name]
            curve = hw.matmul_efficiency["float8"][0]
            flow = "{" + ", ".join(f"{r}: {f:g}" for r, f in curve) + "}"
            for dtype in ("float8", "int8"):
                text, n = re.subn(rf"(?m)^  {dtype}: \{{.*$",
                                  f"  {dtype}: {flow}  # {c.float8_ratio:g} x default, {where}",
                                  text)
                if n != 1:
                    raise ValueError(f"{path}: expected one {dtype} efficiency curve, found {n}")
        path.write_text(text)
        written.append(path)
    return written


def summary(scored: list[dict]) -> str:
    errors = sorted(abs(r["error"]) for r in scored)
    median = errors[len(errors) // 2] if errors else float("nan")
    return (f"{vp.within(scored)} of {len(scored)} within {vp.TARGET:.0%} "
            f"(median |error| {median:.0%}; sources: "
            f"{', '.join(sorted({r['source_key'] for r in scored}))})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit-source", default=FIT_SOURCE,
                   help=f"the source whose rows the constants are fitted on (one of "
                        f"{', '.join(vp.SOURCES)}; default {FIT_SOURCE})")
    p.add_argument("--write", action="store_true",
                   help="write the fitted constants into jaxserve/perf/hardware/*.yaml")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    fit_rows, held_out = split(vp.ROWS, args.fit_source)
    c = fit(fit_rows)
    profiles = with_constants(c)
    scored_fit, scored_held = vp.score(fit_rows, profiles), vp.score(held_out, profiles)
    print(f"fitted on rows {row_span(fit_rows)} ({args.fit_source}): float8_ratio "
          f"{c.float8_ratio:g} (8-bit products at {2 * c.float8_ratio:.2f}x the 16-bit rate), "
          f"layer_overhead_s {c.layer_overhead_s * 1e6:.1f} us\n")
    print("fit set\n" + vp.table(scored_fit) + "\n\nheld out\n" + vp.table(scored_held))
    print(f"\nfit set:  {summary(scored_fit)}\nheld out: {summary(scored_held)}")
    result = {"fit_source": args.fit_source, "fit_rows": [r.number for r in fit_rows],
              "constants": dataclasses.asdict(c), "sources": vp.SOURCES,
              "fit": scored_fit, "held_out": scored_held}
    if args.write:
        for path in write_profiles(c, fit_rows):
            print(f"wrote {path}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result
