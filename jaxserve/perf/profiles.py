"""Hardware profiles: what one device and its links can do, read from `hardware/NAME.yaml`.

A profile holds published peaks (FLOP/s by dtype, memory bandwidth and capacity, interconnect
bandwidth and latency within and across hosts, price) and the fractions of them that real
kernels reach (matmul efficiency by the number of rows of the product, streaming efficiency),
plus the engine's own per-step host time. Published figures cite their source in the file; the
`cpu-local` profile is written by `jaxserve calibrate`, which measures all of it on this machine.
An optional `energy` block gives joules per FLOP, per byte of device memory traffic and per byte
sent over each link, each cited (`energy: ...` entries of `sources`); nothing here measures
energy, so no CPU run checks it.

Units are SI throughout: FLOP/s, bytes/s, bytes, seconds, price per device-hour.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import yaml

HARDWARE_DIR = Path(__file__).resolve().parent / "hardware"
# Bytes per element of the number formats the model knows.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8"}


class ProfileError(ValueError):
    """A hardware profile that is missing, malformed or asks for something unknown."""


def canonical_dtype(name: str, what: str = "dtype") -> str:
    dtype = ALIASES.get(str(name), str(name))
    if dtype not in DTYPE_BYTES:
        raise ProfileError(f"{what} must be one of {', '.join(DTYPE_BYTES)} (or "
                           f"{', '.join(ALIASES)}), got {name!r}")
    return dtype


@dataclasses.dataclass(frozen=True)
class Link:
    """One device's path to its peers: bandwidth in one direction and latency per message hop;
    `efficiency` is the fraction of the bandwidth collectives reach (bus bandwidth / peak)."""

    bandwidth: float
    latency: float
    efficiency: float = 1.0
    # None: a published or measured figure; else why it is neither (a stand-in `calibrate`
    # wrote because it had no such link to time): plans that use the link say so
    unknown: str | None = None

    @property
    def rate(self) -> float:
        return self.bandwidth * self.efficiency


@dataclasses.dataclass(frozen=True)
class HostOverhead:
    """The engine's host time per step that no device count shrinks (Amdahl's serial part):
    a fixed part plus a part per sequence in the step (scheduling, inputs, outputs)."""

    per_step_s: float
    per_sequence_s: float = 0.0

    def seconds(self, sequences: float) -> float:
        return self.per_step_s + self.per_sequence_s * sequences


@dataclasses.dataclass(frozen=True)
class Energy:
    """Joules per unit of work: per FLOP by the product's dtype, per byte read or written in
    device memory, per byte one device sends over the within-host and the between-hosts link."""

    per_flop: dict[str, float]
    per_memory_byte: float
    per_intra_host_byte: float
    per_inter_host_byte: float


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    peak_flops: dict[str, float]  # dense FLOP/s of one device, by the dtype of the product
    # fraction of peak_flops products reach, by shape class: per dtype (or under "default"
    # for every dtype without its own), per hidden width of the model (0: any width; the class
    # is a decoder layer's mix of products at that width), a curve ((rows, fraction), ...) in
    # increasing rows, log-interpolated between points, flat beyond the ends. A model uses the
    # width class nearest its own (in ratio).
    matmul_efficiency: dict[str, dict[int, tuple[tuple[int, float], ...]]]
    memory_bandwidth: float
    memory_capacity: float
    intra_host: Link
    inter_host: Link
    host: HostOverhead
    devices_per_host: int = 8
    bandwidth_efficiency: float = 1.0  # fraction of memory_bandwidth streaming weights reach
    attention_efficiency: float = 1.0  # fraction of memory_bandwidth paged KV reads reach
    attention_query_block: int = 128  # query rows that read the KV context once
    # device time per decoder layer and step that no roofline accounts for: the launch,
    # ramp-up and tail of each of the layer's kernels
    layer_overhead_s: float = 0.0
    memory_fraction: float = 0.9  # of memory_capacity usable for weights and the KV pool
    shared_compute: bool = False  # devices on a host share its cores (simulated CPU devices)
    price_per_hour: float | None = None  # per device
    sources: tuple[str, ...] = ()
    measured: dict[str, Any] | None = None  # what calibrate measured, kept for the record
    energy: Energy | None = None  # None: no cited energy figures

    def matmul_rate(self, dtype: str, rows: float, width: int | None = None) -> float:
        """FLOP/s products with `rows` rows reach in `dtype` in a model of hidden width
        `width`."""
        if dtype not in self.peak_flops:
            raise ProfileError(f"hardware {self.name!r} has no peak FLOP/s for {dtype} "
                               f"(it has: {', '.join(self.peak_flops)})")
        classes = self.matmul_efficiency.get(dtype) or self.matmul_efficiency["default"]
        if width and len(classes) > 1:
            nearest = min(classes, key=lambda w: abs(math.log(width / w)) if w else math.inf)
        else:
            nearest = next(iter(classes))
        return self.peak_flops[dtype] * _log_interpolate(classes[nearest], max(rows, 1.0))

    def unknown_links(self, devices: int) -> list[str]:
        """A warning per link that a deployment over `devices` uses but the profile does not
        know (the within-host link past one device, the between-hosts one past one host)."""
        used = [("intra_host", self.intra_host, devices > 1),
                ("inter_host", self.inter_host, devices > self.devices_per_host)]
        return [f"warning: {self.name}: the {name} link is a stand-in, not a measured or "
                f"published figure ({link.unknown}); layouts that use it may be optimistic"
                for name, link, uses in used
                if uses and link.unknown is not None]

    @property
    def stream_rate(self) -> float:
        """Bytes/s reading weights."""
        return self.memory_bandwidth * self.bandwidth_efficiency

    @property
    def attention_rate(self) -> float:
        """Bytes/s reading KV pages."""
        return self.memory_bandwidth * self.attention_efficiency

    def to_yaml_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["matmul_efficiency"] = {
            dtype: ({r: f for r, f in classes[0]} if set(classes) == {0} else
                    {w: {r: f for r, f in curve} for w, curve in classes.items()})
            for dtype, classes in self.matmul_efficiency.items()}
        d["sources"] = list(self.sources)
        for name in ("intra_host", "inter_host"):
            if d[name]["unknown"] is None:
                del d[name]["unknown"]
        for name in ("measured", "energy"):
            if d[name] is None:
                del d[name]
        return d


def _log_interpolate(curve: tuple[tuple[int, float], ...], rows: float) -> float:
    if rows <= curve[0][0]:
        return curve[0][1]
    for (r0, f0), (r1, f1) in zip(curve, curve[1:]):
        if rows <= r1:
            w = math.log(rows / r0) / math.log(r1 / r0)
            return f0 + w * (f1 - f0)
    return curve[-1][1]


def builtin_profiles() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """`hardware/NAME.yaml`, or a YAML file given by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = HARDWARE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(f"hardware {str(name_or_path)!r}: no such profile {path} (built-in: "
                           f"{', '.join(builtin_profiles())}; `jaxserve calibrate` writes one "
                           f"for this machine)")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(f"{path}: not valid YAML: {e}") from None
    return parse_hardware(doc, str(path))


_REQUIRED = ("name", "peak_flops", "matmul_efficiency", "memory_bandwidth", "memory_capacity",
             "intra_host", "inter_host", "host")


def parse_hardware(doc: Any, source: str) -> Hardware:
    if not isinstance(doc, dict):
        raise ProfileError(f"{source}: a hardware profile must be a mapping")
    known = {f.name for f in dataclasses.fields(Hardware)}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise ProfileError(f"{source}: unknown field(s) {unknown} "
                           f"(known: {', '.join(sorted(known))})")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise ProfileError(f"{source}: missing field(s) {missing}")

    def number(value, what, low=0.0, high=math.inf, strict=True):
        try:
            x = float(value)
        except (TypeError, ValueError):
            raise ProfileError(f"{source}: {what} must be a number, got {value!r}") from None
        if not (low < x if strict else low <= x) or x > high:
            raise ProfileError(f"{source}: {what} must be in {'(' if strict else '['}{low}, "
                               f"{high}], got {value!r}")
        return x

    def mapping(value, what):
        if not isinstance(value, dict) or not value:
            raise ProfileError(f"{source}: {what} must be a non-empty mapping, got {value!r}")
        return value

    def link(value, what):
        value = mapping(value, what)
        extra = sorted(set(value) - {"bandwidth", "latency", "efficiency", "unknown"})
        if extra:
            raise ProfileError(f"{source}: {what}: unknown field(s) {extra}")
        unknown = value.get("unknown")
        if unknown is not None and not isinstance(unknown, str):
            raise ProfileError(f"{source}: {what}.unknown must be text (why the figure is "
                               f"not known), got {unknown!r}")
        return Link(number(value.get("bandwidth"), f"{what}.bandwidth"),
                    number(value.get("latency"), f"{what}.latency", strict=False),
                    number(value.get("efficiency", 1.0), f"{what}.efficiency", high=1.0),
                    unknown)

    peak = {canonical_dtype(k, "peak_flops key"): number(v, f"peak_flops.{k}")
            for k, v in mapping(doc["peak_flops"], "peak_flops").items()}
    def curve(value, what):
        return tuple(sorted((int(number(r, f"{what} rows")), number(f, f"{what}.{r}", high=1.0))
                            for r, f in mapping(value, what).items()))

    curves = {}
    for key, value in mapping(doc["matmul_efficiency"], "matmul_efficiency").items():
        name = "default" if key == "default" else canonical_dtype(key, "matmul_efficiency key")
        what = f"matmul_efficiency.{key}"
        if all(isinstance(v, dict) for v in mapping(value, what).values()):  # by width
            curves[name] = {int(number(w, f"{what} width")): curve(c, f"{what}.{w}")
                            for w, c in value.items()}
        else:
            curves[name] = {0: curve(value, what)}
    if "default" not in curves and set(peak) - set(curves):
        raise ProfileError(f"{source}: matmul_efficiency needs a 'default' curve or one for "
                           f"every dtype of peak_flops")
    host = mapping(doc["host"], "host")
    extra = sorted(set(host) - {"per_step_s", "per_sequence_s"})
    if extra:
        raise ProfileError(f"{source}: host: unknown field(s) {extra}")
    price = doc.get("price_per_hour")
    sources = doc.get("sources") or ()
    if isinstance(sources, str) or not all(isinstance(s, str) for s in sources):
        raise ProfileError(f"{source}: sources must be a list of strings")
    energy = None
    if doc.get("energy") is not None:
        e = mapping(doc["energy"], "energy")
        fields = {"per_flop", "per_memory_byte", "per_intra_host_byte", "per_inter_host_byte"}
        if set(e) != fields:
            raise ProfileError(f"{source}: energy needs exactly {', '.join(sorted(fields))}, got "
                               f"{', '.join(sorted(e))}")
        per_flop = {canonical_dtype(k, "energy.per_flop key"): number(v, f"energy.per_flop.{k}")
                    for k, v in mapping(e["per_flop"], "energy.per_flop").items()}
        if set(peak) - set(per_flop):
            raise ProfileError(f"{source}: energy.per_flop has no figure for "
                               f"{', '.join(sorted(set(peak) - set(per_flop)))}")
        energy = Energy(per_flop, *(number(e[k], f"energy.{k}") for k in (
            "per_memory_byte", "per_intra_host_byte", "per_inter_host_byte")))
    return Hardware(
        name=str(doc["name"]), description=str(doc.get("description", "")),
        peak_flops=peak, matmul_efficiency=curves,
        memory_bandwidth=number(doc["memory_bandwidth"], "memory_bandwidth"),
        memory_capacity=number(doc["memory_capacity"], "memory_capacity"),
        intra_host=link(doc["intra_host"], "intra_host"),
        inter_host=link(doc["inter_host"], "inter_host"),
        host=HostOverhead(number(host.get("per_step_s"), "host.per_step_s", strict=False),
                          number(host.get("per_sequence_s", 0.0), "host.per_sequence_s",
                                 strict=False)),
        devices_per_host=int(number(doc.get("devices_per_host", 8), "devices_per_host")),
        bandwidth_efficiency=number(doc.get("bandwidth_efficiency", 1.0), "bandwidth_efficiency",
                                    high=1.0),
        attention_efficiency=number(doc.get("attention_efficiency", 1.0), "attention_efficiency",
                                    high=1.0),
        attention_query_block=int(number(doc.get("attention_query_block", 128),
                                         "attention_query_block")),
        layer_overhead_s=number(doc.get("layer_overhead_s", 0.0), "layer_overhead_s",
                                strict=False),
        memory_fraction=number(doc.get("memory_fraction", 0.9), "memory_fraction", high=1.0),
        shared_compute=bool(doc.get("shared_compute", False)),
        price_per_hour=None if price is None else number(price, "price_per_hour"),
        sources=tuple(sources), measured=doc.get("measured"), energy=energy)


def save_hardware(hw: Hardware, path: str | Path, header: str = "") -> None:
    text = yaml.safe_dump(hw.to_yaml_dict(), sort_keys=False, width=100)
    Path(path).write_text((header + "\n" if header else "") + text)
