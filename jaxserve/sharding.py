"""Logical axes -> device mesh: the one place that decides how every tensor is partitioned.

Models name each dimension of their parameters and key activations with a *logical* axis from the
closed vocabulary `LOGICAL_AXES`. A rules file (`sharding_rules/NAME.yaml`) maps logical names to
*mesh* axes (`dp`, `tp`, `ep`); the user gives the mesh shape (`dp=2,tp=4`). `Layout` joins the
two and turns a tuple of logical names plus a shape into a `NamedSharding` (which mesh axes split
which dimension is decided by `jaxserve.rules.MeshRules`, which needs no devices). Models never
see mesh axes, so a new parallelism strategy is a new YAML file, not a new model.

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
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from jaxserve import rules as _rules
from jaxserve.rules import MeshRules, Rules, ShardingError

# Rules files and mesh shapes live in `jaxserve.rules` (no jax there: planning tools read them);
# the names callers import from here stay here.
LOGICAL_AXES, MESH_AXES, RULES_DIR = _rules.LOGICAL_AXES, _rules.MESH_AXES, _rules.RULES_DIR
load_rules, parse_mesh, parse_rules = _rules.load_rules, _rules.parse_mesh, _rules.parse_rules
replicas_of = _rules.replicas_of


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    need = math.prod(shape.values())
    if need > len(devices):
        mesh_text = ",".join(f"{k}={v}" for k, v in shape.items())
        processes = jax.process_count()
        where = f" across the {processes} processes" if processes > 1 else ""
        raise ShardingError(f"mesh {mesh_text!r} needs {need} devices but only {len(devices)} "
                            f"{devices[0].platform if devices else ''} device(s) exist{where}")
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
        placed = MeshRules.create(mesh, rules)
        shape, rules = placed.shape, placed.rules
        if abstract:
            return cls(AbstractMesh(tuple(shape.values()), tuple(shape),
                                    axis_types=(AxisType.Auto,) * len(shape)), rules)
        return cls(make_mesh(shape, devices), rules)

    @property
    def mesh_rules(self) -> MeshRules:
        return MeshRules(dict(self.mesh.shape), self.rules)

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
        return _partition_spec(self.mesh_rules.mesh_axes(logical, shape, what, lenient))

    def partition(self, logical: Sequence[str | None]) -> PartitionSpec:
        """PartitionSpec for these logical names, without a shape to check against."""
        return _partition_spec(self.mesh_rules.mesh_axes(logical))

    def sampling_row_axes(self) -> tuple[str, ...]:
        """The mesh axes (of size > 1) that split `vocab` but not `batch`: a sequence-parallel
        sampler gives each device along them its own share of a replica's sample rows."""
        axes = self.mesh_rules.mesh_axes(("batch", "vocab"))[1]
        return tuple(a for a in axes if self.mesh.shape[a] > 1)

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


def _partition_spec(mesh_axes: tuple[tuple[str, ...], ...]) -> PartitionSpec:
    return PartitionSpec(*(None if not axes else axes[0] if len(axes) == 1 else axes
                           for axes in mesh_axes))


_ACTIVE: contextvars.ContextVar[Layout | None] = contextvars.ContextVar("layout", default=None)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Pin an activation's sharding by logical names; a no-op outside an active layout."""
    layout = _ACTIVE.get()
    if layout is None or layout.num_devices == 1:
        return x
    return jax.lax.with_sharding_constraint(x, layout.sharding(logical, x.shape, "activation"))


def active_num_devices() -> int:
    """How many devices the program being traced spans (1 outside an active layout)."""
    layout = _ACTIVE.get()
    return 1 if layout is None else layout.num_devices


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
