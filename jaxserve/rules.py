"""Rules files and mesh shapes: which mesh axes split each logical axis, without devices.

A rules file (built in as `jaxserve/sharding_rules/NAME.yaml`, or a YAML path) maps the logical
axis names models use to mesh axes (`dp`, `tp`, `ep`); the user gives the mesh shape
(`dp=2,tp=4`). `MeshRules` joins the two and says, for a tensor's logical axes and shape, which
mesh axes split each dimension: the one mapping that `jaxserve.sharding.Layout` turns into
`PartitionSpec`s on real (or abstract) meshes and that the performance model (`jaxserve.perf`)
reads to size what each device holds.
This module must never import jax: planning tools read it on machines without accelerators.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Sequence

import yaml

from jaxserve.package_data import rules_dir

LOGICAL_AXES = (
    "batch",      # sequences in a step
    "seq",        # tokens of one sequence in a step
    "vocab",
    "embed",      # model width (hidden_size)
    "q_heads",
    "kv_heads",
    "head_dim",
    "mlp",        # intermediate_size of the dense MLP
    "kv_blocks",  # blocks of the paged KV pool
    "experts",
    "expert_mlp",
    "latent",
)
MESH_AXES = ("dp", "tp", "ep")
RULES_DIR = rules_dir()  # the built-in rules, shipped inside the package


class ShardingError(ValueError):
    """A rules file, mesh string or tensor shape that cannot be partitioned as asked."""


def parse_mesh(text: str) -> dict[str, int]:
    """'dp=2,tp=4' -> {'dp': 2, 'tp': 4} (ordered: outer axis first)."""
    if not isinstance(text, str) or not text.strip():
        raise ShardingError(f"mesh must be a string like 'tp=4' or 'dp=2,tp=4', got {text!r}")
    shape: dict[str, int] = {}
    for part in text.split(","):
        name, eq, size = part.strip().partition("=")
        name = name.strip()
        if not eq or not name:
            raise ShardingError(f"mesh {text!r}: entry {part.strip()!r} is not of the form axis=size")
        if name not in MESH_AXES:
            raise ShardingError(f"mesh {text!r}: unknown mesh axis {name!r} "
                                f"(known: {', '.join(MESH_AXES)})")
        if name in shape:
            raise ShardingError(f"mesh {text!r}: axis {name!r} given twice")
        try:
            n = int(size)
        except ValueError:
            raise ShardingError(f"mesh {text!r}: size of axis {name!r} must be a positive "
                                f"integer, got {size.strip()!r}") from None
        if n < 1:
            raise ShardingError(f"mesh {text!r}: size of axis {name!r} must be >= 1, got {n}")
        shape[name] = n
    return shape


@dataclasses.dataclass(frozen=True)
class Rules:
    """A parsed rules file: logical axis -> tuple of mesh axes (empty = replicated)."""

    name: str
    source: str
    mapping: dict[str, tuple[str, ...]]
    description: str = ""

    @property
    def mesh_axes(self) -> tuple[str, ...]:
        axes: list[str] = []
        for mesh_axes in self.mapping.values():
            axes += [a for a in mesh_axes if a not in axes]
        return tuple(axes)


def load_rules(name_or_path: str | Path) -> Rules:
    """Load a built-in rules file by name (`jaxserve/sharding_rules/NAME.yaml`), or a YAML file
    given by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RULES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RULES_DIR.glob("*.yaml"))
        raise ShardingError(f"rules {str(name_or_path)!r}: no such file {path} "
                            f"(built-in rules: {', '.join(known)})")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ShardingError(f"{path}: not valid YAML: {e}") from None
    return parse_rules(doc, source=str(path), name=path.stem)


def parse_rules(doc: Any, source: str, name: str) -> Rules:
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), dict):
        raise ShardingError(f"{source}: must be a mapping with a 'rules' mapping "
                            f"(logical axis -> mesh axis, list of mesh axes, or null)")
    unknown_keys = sorted(set(doc) - {"rules", "description"})
    if unknown_keys:
        raise ShardingError(f"{source}: unknown top-level key(s) {unknown_keys}")
    mapping: dict[str, tuple[str, ...]] = {}
    for logical, target in doc["rules"].items():
        if logical not in LOGICAL_AXES:
            raise ShardingError(f"{source}: unknown logical axis {logical!r} "
                                f"(known: {', '.join(LOGICAL_AXES)})")
        targets = () if target is None else (target,) if isinstance(target, str) else target
        if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
            raise ShardingError(f"{source}: logical axis {logical!r} maps to {target!r}; expected "
                                "a mesh axis name, a list of them, or null")
        for t in targets:
            if t not in MESH_AXES:
                raise ShardingError(f"{source}: logical axis {logical!r} maps to unknown mesh "
                                    f"axis {t!r} (known: {', '.join(MESH_AXES)})")
        mapping[logical] = tuple(targets)
    return Rules(name=name, source=source, mapping=mapping,
                 description=str(doc.get("description", "")))


@dataclasses.dataclass(frozen=True)
class MeshRules:
    """A mesh shape (outer axis first) plus the rules that place logical axes on it."""

    shape: dict[str, int]
    rules: Rules

    @classmethod
    def create(cls, mesh: str | dict[str, int] | None, rules: str | Path | Rules) -> MeshRules:
        """Check that the rules and the mesh fit each other. `mesh` None: one device, every
        axis the rules use at size 1."""
        rules = rules if isinstance(rules, Rules) else load_rules(rules)
        if mesh is None:
            shape = {a: 1 for a in rules.mesh_axes} or {"tp": 1}
        else:
            shape = parse_mesh(mesh) if isinstance(mesh, str) else dict(mesh)
        missing = [a for a in rules.mesh_axes if a not in shape]
        if missing:
            raise ShardingError(f"{rules.source}: uses mesh axis {missing[0]!r}, which is not in "
                                f"the mesh {shape} (add it, e.g. '{missing[0]}=1')")
        unused = [a for a, n in shape.items() if n > 1 and a not in rules.mesh_axes]
        if unused:
            raise ShardingError(f"mesh axis {unused[0]!r} (size {shape[unused[0]]}) is not used by "
                                f"{rules.source}: every device on it would repeat the same work")
        return cls(shape, rules)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape.values())

    def axis_size(self, mesh_axes: Sequence[str]) -> int:
        return math.prod(self.shape[a] for a in mesh_axes)

    def logical_size(self, logical: str) -> int:
        """Into how many pieces the rules split logical axis `logical` on this mesh."""
        return self.axis_size(self.rules.mapping.get(logical, ()))

    def mesh_axes(self, logical: Sequence[str | None], shape: Sequence[int] | None = None,
                  what: str = "tensor", lenient: bool = False) -> tuple[tuple[str, ...], ...]:
        """The mesh axes that split each dimension of a tensor with these logical names.

        Each dim takes its rule's mesh axes not taken by an earlier dim. With a `shape`, a
        dimension its mesh axes do not divide is an error, or with `lenient` replicated (for a
        tensor restored at its checkpoint shape before it is padded to a divisible one).
        """
        if shape is not None and len(logical) != len(shape):
            raise ShardingError(f"{what}: {len(logical)} logical axes {tuple(logical)} for a "
                                f"tensor of rank {len(shape)}")
        for name in logical:
            if name is not None and name not in LOGICAL_AXES:
                raise ShardingError(f"{what}: unknown logical axis {name!r}")

        def check(name, dim, mesh_axes):
            size = self.axis_size(mesh_axes)
            if dim is None or size == 1 or dim % size == 0:
                return mesh_axes
            if lenient:
                return ()
            raise ShardingError(
                f"{self.rules.source}: logical axis {name!r} of {what} has size {dim}, "
                f"not divisible by mesh axis {'x'.join(mesh_axes)!r} of size {size}")

        parts: list[tuple[str, ...]] = []
        taken: set[str] = set()
        for name, dim in zip(logical, shape if shape is not None else (None,) * len(logical)):
            axes = tuple(a for a in self.rules.mapping.get(name, ()) if a not in taken) \
                if name is not None else ()
            axes = check(name, dim, axes)
            taken.update(axes)
            parts.append(axes)
        return tuple(parts)

    def split_factor(self, logical: Sequence[str | None], shape: Sequence[int],
                     what: str = "tensor") -> int:
        """Into how many pieces a tensor is cut (the rest of the devices hold replicas)."""
        return self.axis_size([a for axes in self.mesh_axes(logical, shape, what) for a in axes])


def replicas_of(layout: MeshRules | Any) -> int:
    """DP replicas: the mesh axes that split a step's sequences. Each replica owns its shard of
    the KV pool, so the rules must split `kv_blocks` exactly as they split `batch`. `layout` is
    a `MeshRules` or a `jaxserve.sharding.Layout` (both have `rules` and `axis_size`)."""
    batch = layout.rules.mapping.get("batch", ())
    blocks = layout.rules.mapping.get("kv_blocks", ())
    if tuple(batch) != tuple(blocks):
        raise ShardingError(
            f"{layout.rules.source}: 'batch' is split over {list(batch)} but 'kv_blocks' over "
            f"{list(blocks)}; each DP replica owns its shard of the KV pool, so map both to the "
            f"same mesh axes")
    return layout.axis_size(tuple(batch))
