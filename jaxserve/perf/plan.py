"""Rank layouts of a model on G devices: replicas x TP x EP, colocated or prefill/decode split.

For every way to cut G devices into identical engines (an engine is a `tp=T` mesh under the
`tp` rules, or for MoE models `ep=E` under `ep` / `tp=T,ep=E` under `tp_ep`, which splits each
expert's width over `tp` even at ep=1), the workload runs
on all engines at once (`serving.colocated`); for every pair of a prefill layout and a decode
layout, the devices are split between prefill and decode engines in the proportion that serves
the most requests (`serving.prefill_role`, `serving.decode_role`). Layouts are ranked by output
tokens per second, those that meet the SLO first; each names its bottleneck (compute, memory
bandwidth, interconnect, kernel launches, host or KV capacity), its cost per million tokens and,
where the profile cites energy figures, its joules per output token split into compute, device
memory and interconnect traffic (`energy`).

t_e (Albireo's empirical optimal TP degree) is the TP degree of the best colocated layout: past
it, the host's non-scalable time and the collectives outweigh the memory and bandwidth more
devices per engine bring.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from jaxserve.config import FORMAT_VERSION, ModelConfig, from_hf_config
from jaxserve.perf import energy, serving
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import Hardware
from jaxserve.perf.speculative import Speculation
from jaxserve.perf.step import Deployment
from jaxserve.perf.workload import Workload
from jaxserve.rules import ShardingError

KEEP_PER_ROLE = 6  # best prefill and decode layouts paired for disaggregated serving


class PlanError(ValueError):
    """Planning inputs that cannot describe a deployment."""


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None

    @classmethod
    def parse(cls, text: str | None) -> SLO:
        """'ttft=500ms,tpot=50ms' (units s or ms; a bare number is seconds)."""
        if not text:
            return cls()
        out: dict[str, float] = {}
        for part in text.split(","):
            key, eq, value = part.strip().partition("=")
            if not eq or key not in ("ttft", "tpot"):
                raise PlanError(f"slo {text!r}: {part.strip()!r} is not ttft=TIME or tpot=TIME")
            value = value.strip()
            scale = 1e-3 if value.endswith("ms") else 1.0
            try:
                seconds = float(value.removesuffix("ms").removesuffix("s")) * scale
            except ValueError:
                raise PlanError(f"slo {text!r}: {key} must be a time like 0.5, 0.5s or 500ms, "
                                f"got {value!r}") from None
            if seconds <= 0:
                raise PlanError(f"slo {text!r}: {key} must be positive, got {value!r}")
            out[f"{key}_s"] = seconds
        return cls(**out)

    def met(self, ttft_s: float, tpot_s: float) -> bool:
        return ((self.ttft_s is None or ttft_s <= self.ttft_s)
                and (self.tpot_s is None or tpot_s <= self.tpot_s))


@dataclasses.dataclass
class Candidate:
    layout: str
    kind: str  # colocated, disaggregated
    tp: int  # TP degree of an engine (of the decode engines when split)
    ep: int
    devices: int  # used
    engines: str
    batch: float  # sequences decoding per replica
    ttft_s: float
    tpot_s: float
    output_tokens_per_s: float
    cost_per_million: float | None
    bottleneck: str
    limited_by: str
    meets_slo: bool
    saturated: bool
    breakdown: dict[str, float]  # the decode-side step, seconds by bound
    weight_bytes_per_device: float  # of the decode-side engine
    kv_capacity_tokens: int  # per DP replica of the decode-side engine
    joules_per_token: dict[str, float] | None = None  # per output token; None: no figures
    prefill_precision: str | None = None  # of each role (colocated: both the same)
    decode_precision: str | None = None
    handoff_bytes: float | None = None  # per request, in the decode engine's KV format
    handoff_s: float | None = None

    @property
    def per_device(self) -> float:
        return self.output_tokens_per_s / self.devices

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "output_tokens_per_s_per_device": self.per_device}


@dataclasses.dataclass
class Plan:
    model: str
    devices: int
    hardware: Hardware
    workload: Workload
    precision: Precision
    decode_precision: Precision
    slo: SLO
    candidates: list[Candidate]
    skipped: dict[str, str]
    t_e: int | None
    throughput_by_tp: dict[int, float]
    role_precisions: list[Precision] | None = None  # set: a column of each row's precisions

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "devices": self.devices, "hardware": self.hardware.name,
                "precision": str(self.precision),
                "decode_precision": str(self.decode_precision),
                "workload": self.workload.to_dict(), "slo": dataclasses.asdict(self.slo),
                "t_e": self.t_e, "throughput_by_tp": self.throughput_by_tp,
                "role_precisions": (None if self.role_precisions is None
                                    else [str(p) for p in self.role_precisions]),
                "layouts": [c.to_dict() for c in self.candidates], "skipped": self.skipped,
                "warnings": self.hardware.unknown_links(self.devices)}

    def table(self, top: int = 15) -> str:
        head = ("#", "layout", "dev", "batch", "TTFT ms", "TPOT ms", "out tok/s", "tok/s/dev",
                "$/M tok", "mJ/tok (FLOP/HBM/link)", "bottleneck", "SLO")
        rows = [head]
        for i, c in enumerate(self.candidates[:top], 1):
            rows.append((str(i), c.layout, str(c.devices), f"{c.batch:.0f}",
                         f"{c.ttft_s * 1e3:.1f}", f"{c.tpot_s * 1e3:.2f}",
                         f"{c.output_tokens_per_s:,.0f}", f"{c.per_device:,.1f}",
                         "-" if c.cost_per_million is None else f"{c.cost_per_million:.3f}",
                         _millijoules(c.joules_per_token),
                         c.bottleneck + (" (saturated)" if c.saturated else ""),
                         "yes" if c.meets_slo else "no"))
        if self.role_precisions is not None:
            rows = [row[:2] + extra + row[2:] for row, extra in zip(rows, [
                ("precision P / D", "handoff MB")] + [_role_cells(c) for c in
                                                      self.candidates[:top]])]
        right = (0, 2, 3, 4, 5, 6, 7, 8, 9) if self.role_precisions is None else \
            (0, 3, 4, 5, 6, 7, 8, 9, 10, 11)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                           for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                 for row in rows]
        w = self.workload
        precision = (f"precision {self.precision}" if self.role_precisions is None else
                     "precisions per role: " + "; ".join(map(str, self.role_precisions)))
        intro = [f"{self.model} on {self.devices} x {self.hardware.name} "
                 f"({self.hardware.description}); {precision}"
                 + (f", decode {self.decode_precision}"
                    if self.decode_precision != self.precision else ""),
                 f"workload: prompt {w.mean_prompt:.0f} (new {w.mean_new_prompt:.0f}) + output "
                 f"{w.mean_output:.0f} tokens on average"
                 + (f", {w.rate:g} requests/s" if w.rate else "")
                 + (f", {w.concurrency:g} in flight" if w.concurrency else "")
                 + f"; max_num_seqs {w.max_num_seqs}, max_num_batched_tokens "
                 f"{w.max_num_batched_tokens}"]
        intro += self.hardware.unknown_links(self.devices)
        if self.t_e is not None:
            by_tp = ", ".join(f"TP {t}: {v:,.0f}" for t, v in sorted(self.throughput_by_tp.items()))
            intro.append(f"t_e = {self.t_e} (TP degree of the best colocated layout; output "
                         f"tok/s by TP degree: {by_tp})")
        if len(self.candidates) > top:
            lines.append(f"... {len(self.candidates) - top} more in the JSON")
        return "\n".join(intro + [""] + lines)


DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float8": "fp8",
                "int8": "int8"}


def precision_label(p: Precision) -> str:
    """'bf16', or 'W int8 KV fp8' where weights and KV differ (products follow the weights)."""
    w, kv = DTYPE_LABELS.get(p.weights, p.weights), DTYPE_LABELS.get(p.kv, p.kv)
    return w if p.weights == p.kv else f"W {w} KV {kv}"


def _role_cells(c: Candidate) -> tuple[str, str]:
    if c.prefill_precision is None:
        return "-", "-"
    roles = (c.prefill_precision if c.kind == "colocated"
             else f"{c.prefill_precision} / {c.decode_precision}")
    return roles, "-" if c.handoff_bytes is None else f"{c.handoff_bytes / 1e6:.2f}"


def _millijoules(j: dict[str, float] | None) -> str:
    if j is None:
        return "-"
    return (f"{j['total'] * 1e3:.3g} ({j['compute'] * 1e3:.3g}/{j['memory'] * 1e3:.3g}/"
            f"{j['interconnect'] * 1e3:.3g})")


def _as_dict(j: energy.Joules | None) -> dict[str, float] | None:
    return None if j is None else j.to_dict()


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def engine_layouts(config: ModelConfig, devices: int) -> list[tuple[int, int, str, str]]:
    """(tp, ep, mesh, rules) of every engine size that divides `devices`. A MoE model's
    experts are split too: over `tp` by their width (`tp_ep`, also at ep=1), over `ep` whole.
    With both, each axis order is a layout: the inner axis keeps its groups inside a host."""
    out = []
    for tp in divisors(devices):
        for ep in (divisors(devices // tp) if config.is_moe else [1]):
            if not config.is_moe or tp == ep == 1:
                out.append((tp, ep, f"tp={tp}", "tp"))
            elif tp == 1:
                out.append((tp, ep, f"ep={ep}", "ep"))
            elif ep == 1:
                out.append((tp, ep, f"tp={tp},ep=1", "tp_ep"))
            else:
                out += [(tp, ep, f"ep={ep},tp={tp}", "tp_ep"),
                        (tp, ep, f"tp={tp},ep={ep}", "tp_ep")]
    return out


def _cost(hw: Hardware, devices: int, tokens_per_s: float) -> float | None:
    if hw.price_per_hour is None or tokens_per_s <= 0:
        return None
    return hw.price_per_hour * devices / 3600 / tokens_per_s * 1e6


def plan(config: ModelConfig, devices: int, hardware: Hardware, workload: Workload,
         precision: Precision | None = None, decode_precision: Precision | None = None,
         slo: SLO | None = None, disaggregated: bool = True, model_name: str = "model",
         speculation: Speculation | None = None, draft_config: ModelConfig | None = None
         ) -> Plan:
    """speculation: every colocated layout decodes speculatively (acceptance, k); with
    `draft_config` a draft model proposes on the same engine's mesh, after each verify (no
    prefill/decode splits are ranked then: their decode role does not model it)."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise PlanError(f"devices must be a positive integer, got {devices!r}")
    precision = precision or Precision()
    decode_precision = decode_precision or precision
    slo = slo or SLO()
    for p in (precision, decode_precision):
        if p.compute not in hardware.peak_flops:
            raise PlanError(f"hardware {hardware.name!r} has no {p.compute} products (it has "
                            f"{', '.join(hardware.peak_flops)}): choose another precision")
    disaggregated = disaggregated and speculation is None
    candidates: list[Candidate] = []
    skipped: dict[str, str] = {}
    prefill_side, decode_side = [], []
    for tp, ep, mesh, rules in engine_layouts(config, devices):
        engines = devices // (tp * ep)
        label = f"{engines} x {mesh} ({rules})"
        try:
            d = Deployment(config, mesh, rules, hardware, precision)
        except ShardingError as e:
            skipped[label] = str(e)
            continue
        label = f"{engines} x {d.label}"
        spec = speculation
        try:
            if speculation is not None and draft_config is not None:
                spec = dataclasses.replace(speculation, draft=Deployment(
                    draft_config, mesh, rules, hardware, precision))
            op = serving.colocated(d, workload, engines, spec)
        except ShardingError as e:
            skipped[label] = f"draft model: {e}"
        except serving.DoesNotFit as e:
            skipped[label] = str(e)
        else:
            tokens = op.output_tokens_per_s * engines
            candidates.append(Candidate(
                label, "colocated", tp, ep, devices, f"{engines}", op.batch, op.ttft_s,
                op.tpot_s, tokens, _cost(hardware, devices, tokens), op.bottleneck,
                op.limited_by, slo.met(op.ttft_s, op.tpot_s) and not op.saturated,
                op.saturated, op.step.breakdown(), d.weight_bytes_per_device,
                d.kv_capacity_tokens, _as_dict(energy.per_output_token(d, op))))
        if disaggregated and devices > 1:
            _roles(config, mesh, rules, hardware, precision, decode_precision, workload, d,
                   prefill_side, decode_side)
    if disaggregated and devices > 1:
        candidates += _disaggregated(prefill_side, decode_side, devices, hardware, workload, slo)
    candidates.sort(key=lambda c: (not c.meets_slo, -c.output_tokens_per_s))
    t_e, by_tp = t_e_of(candidates)
    return Plan(model_name, devices, hardware, workload, precision, decode_precision, slo,
                candidates, skipped, t_e, by_tp)


def t_e_of(candidates: list[Candidate]) -> tuple[int | None, dict[int, float]]:
    """(t_e, the best colocated output tokens per second by TP degree)."""
    by_tp: dict[int, float] = {}
    for c in candidates:
        if c.kind == "colocated":
            by_tp[c.tp] = max(by_tp.get(c.tp, 0.0), c.output_tokens_per_s)
    return (max(by_tp, key=by_tp.get) if by_tp else None), by_tp


def _roles(config, mesh, rules, hardware, precision, decode_precision, workload, d,
           prefill_side, decode_side) -> None:
    """This engine layout in the prefill role and in the decode role, where it fits."""
    try:
        prefill_side.append((d, serving.prefill_role(d, workload)))
    except serving.DoesNotFit:
        pass
    dd = d if decode_precision == precision else Deployment(config, mesh, rules, hardware,
                                                            decode_precision)
    try:
        decode_side.append((dd, serving.decode_role(dd, workload)))
    except serving.DoesNotFit:
        pass


def _disaggregated(prefill_side, decode_side, devices, hw, w, slo, link=None) -> list[Candidate]:
    """The best split of `devices` for each pair of a prefill and a decode engine layout; the
    handoff over `link` (None: the profile's link between the pools' hosts)."""
    def best(side):
        return sorted(side, key=lambda x: -x[1].requests_per_s / x[0].devices)[:KEEP_PER_ROLE]

    out = []
    for dp, p in best(prefill_side):
        for dd, q in best(decode_side):
            split = None
            for n_p in range(1, devices // dp.devices + 1):
                n_d = (devices - n_p * dp.devices) // dd.devices
                if n_d < 1:
                    break
                rate = min(n_p * p.requests_per_s, n_d * q.requests_per_s)
                if split is None or rate > split[0]:
                    split = (rate, n_p, n_d)
            if split is None:
                continue
            rate, n_p, n_d = split
            saturated = w.rate is not None and rate < w.rate
            decode = q if w.rate is None or saturated else serving.decode_role(
                dd, w, w.rate / n_d)
            if w.rate is not None and not saturated:
                rate = w.rate
            used = n_p * dp.devices + n_d * dd.devices
            same_host = used <= hw.devices_per_host
            handoff_s = serving.kv_handoff_s(dp, dd, w, same_host, link)
            ttft = p.ttft_s + handoff_s
            tokens = rate * w.mean_output
            label = f"P {n_p} x {dp.label} | D {n_d} x {dd.label}"
            bottleneck = decode.bottleneck if n_d * q.requests_per_s <= n_p * p.requests_per_s \
                else p.step.bottleneck
            decode_j = energy.per_output_token(dd, decode)
            prefill_j = energy.prefill_per_request(dp, p)
            joules = (None if decode_j is None or prefill_j is None
                      else decode_j + prefill_j.scaled(1 / w.mean_output))
            out.append(Candidate(
                label, "disaggregated", _axis(dd, "tp"), _axis(dd, "ep"), used,
                f"{n_p}+{n_d}", decode.batch, ttft, decode.tpot_s, tokens,
                _cost(hw, used, tokens), bottleneck, decode.limited_by,
                slo.met(ttft, decode.tpot_s) and not saturated, saturated,
                decode.step.breakdown(), dd.weight_bytes_per_device, dd.kv_capacity_tokens,
                _as_dict(joules), precision_label(dp.precision), precision_label(dd.precision),
                serving.kv_handoff_bytes(dd, w), handoff_s))
    return out


def _axis(d: Deployment, axis: str) -> int:
    return d.mesh.shape.get(axis, 1)


def load_model_config(path: str) -> tuple[ModelConfig, str]:
    """A model to plan for: a jaxserve checkpoint directory, our config.json, or an HF
    config.json (or a directory holding one)."""
    p = Path(path)
    file = p / "config.json" if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"model config not found: {file}")
    try:
        doc = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"{file}: not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise PlanError(f"{file}: a config.json must be a JSON object")
    name = file.parent.name if file.name == "config.json" else file.stem
    if doc.get("format_version") == FORMAT_VERSION:
        return ModelConfig.from_json_dict(doc, str(file)), name
    return from_hf_config(doc, str(file)), name
