"""Logical axes -> device mesh: the one place that decides how every tensor is partitioned.

Models name each dimension of their parameters and key activations with a *logical* axis from the
closed vocabulary `LOGICAL_AXES`. A rules file (`sharding_rules/NAME.yaml`) maps logical names to
*mesh* axes (`dp`, `tp`, `ep`); the user gives the mesh shape (`dp=2,tp=4`). `Layout` joins the
two and turns a tuple of logical names plus a shape into a `NamedSharding`. Models never see mesh
axes, so a new parallelism strategy is a new YAML file, not a new model.

The mesh uses Auto axis types: models are written as single-device math plus sharding
constraints, and XLA's partitioner inserts the collectives. (Explicit axis types would make every
model op state its output sharding, which models must not know about.)

Every dimension must divide its mesh axes. Model sizes that would not (a 32001-token vocabulary
at tp=2, 2 KV heads at tp=8) are fitted before they get here: `jaxserve.placement.fit_to_layout`
pads the vocabulary and repeats KV heads, so the devices hold shapes that split evenly. Only
staging a tensor at its checkpoint shape, before it is fitted, asks for `lenient` specs.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

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
RULES_DIR = Path(__file__).resolve().parent.parent / "sharding_rules"


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
    """Load `sharding_rules/NAME.yaml`, or a YAML file given by path."""
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


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape.values())
    if need > len(devices):
        mesh_text = ",".join(f"{k}={v}" for k, v in shape.items())
        raise ShardingError(f"mesh {mesh_text!r} needs {need} devices but only {len(devices)} "
                            f"{devices[0].platform if devices else ''} device(s) exist")
    grid = np.array(devices[:need], dtype=object).reshape(tuple(shape.values()))
    return Mesh(grid, tuple(shape), axis_types=(AxisType.Auto,) * len(shape))


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh plus the rules that place logical axes on it."""

    mesh: Mesh | AbstractMesh
    rules: Rules

    @classmethod
    def create(cls, mesh: str | dict[str, int] | None, rules: str | Path | Rules,
               devices: Sequence[jax.Device] | None = None, abstract: bool = False) -> Layout:
        """abstract=True: a mesh of the right shape without devices (for planning and
        inspection; `spec` works, placing arrays does not)."""
        rules = rules if isinstance(rules, Rules) else load_rules(rules)
        if mesh is None:  # one device: every axis the rules use, at size 1
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
        if abstract:
            return cls(AbstractMesh(tuple(shape.values()), tuple(shape),
                                    axis_types=(AxisType.Auto,) * len(shape)), rules)
        return cls(make_mesh(shape, devices), rules)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.shape.values())

    def axis_size(self, mesh_axes: tuple[str, ...]) -> int:
        return math.prod(self.mesh.shape[a] for a in mesh_axes)

    def spec(self, logical: Sequence[str | None], shape: Sequence[int],
             what: str = "tensor", lenient: bool = False) -> PartitionSpec:
        """PartitionSpec for a tensor whose dims carry these logical names.

        A dimension its mesh axes do not divide is an error, or with `lenient` replicated
        (for a tensor restored at its checkpoint shape before it is padded to a divisible one).
        """
        if len(logical) != len(shape):
            raise ShardingError(f"{what}: {len(logical)} logical axes {tuple(logical)} for a "
                                f"tensor of rank {len(shape)}")
        for name in logical:
            if name is not None and name not in LOGICAL_AXES:
                raise ShardingError(f"{what}: unknown logical axis {name!r}")

        def check(name, dim, mesh_axes):
            size = self.axis_size(mesh_axes)
            if size > 1 and dim % size:
                if lenient:
                    return ()
                raise ShardingError(
                    f"{self.rules.source}: logical axis {name!r} of {what} has size {dim}, "
                    f"not divisible by mesh axis {'x'.join(mesh_axes)!r} of size {size}")
            return mesh_axes

        return self._partition(logical, shape, check)

    def partition(self, logical: Sequence[str | None]) -> PartitionSpec:
        """PartitionSpec for these logical names, without a shape to check against."""
        return self._partition(logical, (None,) * len(logical),
                               lambda name, dim, mesh_axes: mesh_axes)

    def _partition(self, logical, shape, check) -> PartitionSpec:
        """The one mapping of logical dims to mesh axes: each dim takes its rule's mesh axes
        not taken by an earlier dim; `check(name, dim, mesh_axes)` may veto (replicate)."""
        parts: list[Any] = []
        taken: set[str] = set()
        for name, dim in zip(logical, shape):
            mesh_axes = tuple(a for a in self.rules.mapping.get(name, ()) if a not in taken) \
                if name is not None else ()
            mesh_axes = check(name, dim, mesh_axes)
            taken.update(mesh_axes)
            parts.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                         else mesh_axes)
        return PartitionSpec(*parts)

    def split_factor(self, spec: PartitionSpec) -> int:
        """Into how many pieces a tensor with this spec is cut (the rest are replicas)."""
        axes = [a for part in spec if part for a in ((part,) if isinstance(part, str) else part)]
        return self.axis_size(tuple(axes))

    def sharding(self, logical: Sequence[str | None], shape: Sequence[int],
                 what: str = "tensor", lenient: bool = False) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(logical, shape, what, lenient))

    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    @contextlib.contextmanager
    def activate(self) -> Iterator[Layout]:
        """Make `constrain` place activations on this layout (used while tracing a program)."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside an active layout."""
    layout = _ACTIVE.get()
    if layout is None or layout.num_devices == 1:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(logical, x.shape, "activation"))


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def shard_map_logical(fn, in_axes, out_axes):
    """`fn` run per device on its shards, with shards named by logical axes (pytrees of axis
    tuples matching the arguments and results). Without an active multi-device layout, `fn`
    itself. Inside, `fn` sees local shapes: e.g. its replica's tokens and its own heads."""
    layout = _ACTIVE.get()
    if layout is None or layout.num_devices == 1:
        return fn

    def wrapped(*args):
        in_specs = jax.tree.map(lambda axes, x: layout.spec(axes, x.shape, "shard_map input"),
                                in_axes, args, is_leaf=_is_axes)
        out_specs = jax.tree.map(layout.partition, out_axes, is_leaf=_is_axes)
        return jax.shard_map(fn, mesh=layout.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)

    return wrapped


# ---- collectives inside `shard_map_logical`, named by logical axis ----
# A layer that exchanges data (e.g. experts over `ep`) names the logical axis it communicates
# along; the active layout says which mesh axes that is. With the axis unsplit (one device, or a
# rules file that does not map it) each collective is the identity.

def collective_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that `logical` is split over on the active layout."""
    layout = _ACTIVE.get()
    if layout is None or layout.num_devices == 1:
        return ()
    return tuple(a for a in layout.rules.mapping.get(logical, ()) if layout.mesh.shape[a] > 1)


def axis_size_logical(logical: str) -> int:
    layout = _ACTIVE.get()
    return layout.axis_size(collective_axes(logical)) if layout is not None else 1


def axis_index_logical(logical: str) -> jax.Array | int:
    """This device's index along `logical`'s mesh axes (0 when it is not split)."""
    axes = collective_axes(logical)
    return jax.lax.axis_index(axes) if axes else 0


def all_gather_logical(x: jax.Array, logical: str, axis: int) -> jax.Array:
    """Concatenate every device's shard of `x` along `axis` (the dim `logical` splits)."""
    axes = collective_axes(logical)
    return jax.lax.all_gather(x, axes, axis=axis, tiled=True) if axes else x


def all_to_all_logical(x: jax.Array, logical: str, split_axis: int,
                       concat_axis: int) -> jax.Array:
    """Piece i of `x` along `split_axis` goes to device i along `logical`'s mesh axes; the
    pieces received are concatenated along `concat_axis` in device order."""
    axes = collective_axes(logical)
    return (jax.lax.all_to_all(x, axes, split_axis, concat_axis, tiled=True) if axes else x)


def ragged_all_to_all_logical(operand, output, input_offsets, send_sizes, output_offsets,
                              recv_sizes, logical: str) -> jax.Array:
    """`jax.lax.ragged_all_to_all` along `logical`'s mesh axes (one slice per device). On a
    platform without the op (XLA:CPU) the same semantics are computed with a fixed-capacity
    `all_to_all` of every slice padded to the operand's length."""
    axes = collective_axes(logical)
    if axes and jax.default_backend() != "cpu":
        return jax.lax.ragged_all_to_all(operand, output, input_offsets, send_sizes,
                                         output_offsets, recv_sizes, axis_name=axes)
    devices, capacity = input_offsets.shape[0], operand.shape[0]
    r = jnp.arange(capacity)
    # slice j of the operand, padded to `capacity` rows; rows past its size are never written
    take = jnp.minimum(input_offsets[:, None] + r, capacity - 1)
    send = operand[take]
    send_valid = r < send_sizes[:, None]
    received = all_to_all_logical(send, logical, 0, 0)
    valid = all_to_all_logical(send_valid, logical, 0, 0) & (r < recv_sizes[:, None])
    where = all_to_all_logical(output_offsets, logical, 0, 0)[:, None] + r  # [senders, rows]
    where = jnp.where(valid, where, output.shape[0])  # out of range: dropped
    return output.at[where.reshape(-1)].set(received.reshape(devices * capacity,
                                                            *operand.shape[1:]), mode="drop")


def psum_logical(x: jax.Array, logical: str) -> jax.Array:
    """Sum partial results over the devices that split `logical`."""
    axes = collective_axes(logical)
    return jax.lax.psum(x, axes) if axes else x


def replicas_of(layout: Layout) -> int:
    """DP replicas: the mesh axes that split a step's sequences. Each replica owns its shard of
    the KV pool, so the rules must split `kv_blocks` exactly as they split `batch`."""
    batch = layout.rules.mapping.get("batch", ())
    blocks = layout.rules.mapping.get("kv_blocks", ())
    if tuple(batch) != tuple(blocks):
        raise ShardingError(
            f"{layout.rules.source}: 'batch' is split over {list(batch)} but 'kv_blocks' over "
            f"{list(blocks)}; each DP replica owns its shard of the KV pool, so map both to the "
            f"same mesh axes")
    return layout.axis_size(tuple(batch))
