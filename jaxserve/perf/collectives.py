"""Collective costs: ring and tree formulas from the message size and the group size.

The alpha-beta model: a message step costs the link's latency (alpha) plus bytes over the
link's achieved bandwidth (beta = 1 / rate). `nbytes` is always the size of the whole tensor
(the all-reduced tensor, the gathered result, everything one device sends in an all-to-all);
`n` the number of devices in the group. A group that spans hosts runs hierarchically: inside
each host over the fast link, across hosts over the slow one.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from jaxserve.perf.profiles import Hardware, Link


def ring_all_reduce(nbytes: float, n: int, link: Link) -> float:
    """Reduce-scatter then all-gather around a ring: each device sends and receives
    2 (n - 1) / n of the tensor in 2 (n - 1) steps."""
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n * nbytes / link.rate + 2 * (n - 1) * link.latency


def tree_all_reduce(nbytes: float, n: int, link: Link) -> float:
    """Reduce up a binary tree and broadcast back down, pipelined in chunks (NCCL's double
    binary tree): 2 ceil(log2 n) latencies, and each link carries the tensor once each way."""
    if n <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.latency + 2 * nbytes / link.rate


def all_reduce(nbytes: float, n: int, link: Link) -> float:
    """The faster of ring (bandwidth-optimal, large messages) and tree (latency-optimal, small
    messages), as collective libraries choose by size."""
    return min(ring_all_reduce(nbytes, n, link), tree_all_reduce(nbytes, n, link))


def all_gather(nbytes: float, n: int, link: Link) -> float:
    """Ring all-gather of a tensor of `nbytes` (each device starts with 1/n of it): n - 1
    steps, each device receives (n - 1) / n of it. A reduce-scatter costs the same."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.rate + (n - 1) * link.latency


reduce_scatter = all_gather


def all_to_all(nbytes: float, n: int, link: Link) -> float:
    """Pairwise exchange: each device sends (n - 1) / n of its `nbytes` (the rest is its own
    piece) in n - 1 steps."""
    if n <= 1:
        return 0.0
    return (n - 1) / n * nbytes / link.rate + (n - 1) * link.latency


@dataclasses.dataclass(frozen=True)
class Group:
    """The devices of one collective: `size` in all, `per_host` of them on each host."""

    size: int
    per_host: int

    @property
    def hosts(self) -> int:
        return self.size // self.per_host


def group_of(mesh_shape: dict[str, int], axes: tuple[str, ...], devices_per_host: int) -> Group:
    """The group of devices that differ only along `axes` of a mesh whose devices are numbered
    row-major (outer axis first, as `jaxserve.sharding.make_mesh` lays them out) and filled
    into hosts of `devices_per_host` in that order."""
    names = list(mesh_shape)
    strides, stride = {}, 1
    for name in reversed(names):
        strides[name] = stride
        stride *= mesh_shape[name]
    members = [sum(i * strides[a] for a, i in zip(axes, idx))
               for idx in itertools.product(*(range(mesh_shape[a]) for a in axes))]
    on_first_host = sum(1 for m in members if m // devices_per_host == 0)
    return Group(len(members), max(1, on_first_host))


def group_all_reduce(nbytes: float, group: Group, hw: Hardware) -> float:
    """Within a host: one all-reduce. Across hosts: reduce-scatter inside each host, all-reduce
    of the 1/per_host shards across hosts, all-gather inside each host."""
    d, h = group.per_host, group.hosts
    if h == 1:
        return all_reduce(nbytes, d, hw.intra_host)
    if d == 1:
        return all_reduce(nbytes, h, hw.inter_host)
    return (reduce_scatter(nbytes, d, hw.intra_host) + all_reduce(nbytes / d, h, hw.inter_host)
            + all_gather(nbytes, d, hw.intra_host))


def group_all_gather(nbytes: float, group: Group, hw: Hardware) -> float:
    """Across hosts first (devices with the same place in their host gather 1/per_host of the
    result), then inside each host."""
    d, h = group.per_host, group.hosts
    if h == 1:
        return all_gather(nbytes, d, hw.intra_host)
    return all_gather(nbytes / d, h, hw.inter_host) + all_gather(nbytes, d, hw.intra_host)


def group_all_to_all(nbytes: float, group: Group, hw: Hardware) -> float:
    """Each device's pieces for its own host go over the fast link, the rest over the slow
    one, at the same time: the slower of the two, plus a latency per peer."""
    d, n = group.per_host, group.size
    if group.hosts == 1:
        return all_to_all(nbytes, n, hw.intra_host)
    local = (d - 1) / n * nbytes / hw.intra_host.rate
    remote = (n - d) / n * nbytes / hw.inter_host.rate
    return max(local, remote) + (d - 1) * hw.intra_host.latency + (n - d) * hw.inter_host.latency


GROUP_COLLECTIVES = {"all-reduce": group_all_reduce, "all-gather": group_all_gather,
                     "all-to-all": group_all_to_all}


def traffic(kind: str, nbytes: float, group: Group, hw: Hardware) -> tuple[float, float]:
    """Bytes one device sends in one such collective, over (the within-host link, the
    between-hosts link): the formulas above on links of unit rate and no latency, one link at a
    time (the other free), so the time they return is the bytes that link carries."""
    unit, free = Link(1.0, 0.0), Link(math.inf, 0.0)
    run = GROUP_COLLECTIVES[kind]
    return (run(nbytes, group, dataclasses.replace(hw, intra_host=unit, inter_host=free)),
            run(nbytes, group, dataclasses.replace(hw, intra_host=free, inter_host=unit)))
