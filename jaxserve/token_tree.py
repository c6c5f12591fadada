"""A static token tree for speculative decoding: which proposed node follows which.

A tree is given as parent indices: node i's parent is `parents[i]`, -1 for the root (the
sequence's last token, which is not a node), and every parent comes before its children, so
laying the nodes out in index order keeps every ancestor before its descendants. `"WxD"` is W
chains of D nodes under the root (chain c holds nodes c*D .. c*D + D - 1): W candidates for the
next token, each continued D - 1 tokens; chain 0 alone is the plain run of D proposals.

In a step, node i's token sits at depth(i) past the sequence's last token (its position, for
RoPE) but is written to the KV slot i past it (siblings share a depth, not a slot), and it
attends to the sequence's context and to its own ancestors only: `ancestor_masks` gives, per
node, the bit set of the nodes it sees (jaxserve/ops/attention.py takes it in the metadata).
Base layer: pure Python, no jax.
"""

from __future__ import annotations

import dataclasses
import re

MAX_TREE_NODES = 31  # a node's ancestors (and itself) are bits of one int32 mask


@dataclasses.dataclass(frozen=True)
class TokenTree:
    parents: tuple[int, ...]

    @property
    def size(self) -> int:
        return len(self.parents)

    def depth(self, node: int) -> int:
        """1 for a child of the root."""
        d = 0
        while node >= 0:
            node, d = self.parents[node], d + 1
        return d

    @property
    def max_depth(self) -> int:
        return max((self.depth(i) for i in range(self.size)), default=0)

    @property
    def leaves(self) -> list[int]:
        has_child = set(self.parents)
        return [i for i in range(self.size) if i not in has_child]

    @property
    def step_rows(self) -> int:
        """Decode rows a sequence takes in a step with the whole tree: one run per branch,
        each the last token and the branch's nodes."""
        return sum(1 + self.depth(leaf) for leaf in self.leaves)

    def ancestor_masks(self) -> list[int]:
        """Per node, bit j set iff node j is the node itself or one of its ancestors."""
        masks: list[int] = []
        for parent in self.parents:
            masks.append((masks[parent] if parent >= 0 else 0) | 1 << len(masks))
        return masks

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node`."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]


    def branches(self, candidates: list[list[int]]) -> list[list[int]]:
        """Candidate continuations fitted into the tree as a trie (each one follows the
        children already holding its tokens, then takes free ones while the tree has them),
        as its root-to-leaf branches of tokens, the first candidate's first."""
        children: dict[int, list[int]] = {}
        for i, parent in enumerate(self.parents):
            children.setdefault(parent, []).append(i)
        token: dict[int, int] = {}
        for candidate in candidates:
            node = -1
            for t in candidate:
                kids = children.get(node, [])
                same = [k for k in kids if token.get(k) == t]
                free = [k for k in kids if k not in token]
                if not same and not free:
                    break
                node = same[0] if same else free[0]
                token[node] = t
        leaves = [i for i in sorted(token)
                  if not any(k in token for k in children.get(i, []))]
        return [[token[i] for i in self.path(leaf)] for leaf in leaves]


def parse_tree(spec: str | list | tuple | TokenTree) -> TokenTree:
    """`"WxD"` or parent indices (a list, or a comma-separated string), validated; errors name
    the value."""
    if isinstance(spec, TokenTree):
        return spec
    if isinstance(spec, str) and re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*", spec):
        spec = [int(x) for x in spec.split(",")]  # parent indices, as a flag gives them
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec)
        if not match or int(match[1]) < 1 or int(match[2]) < 1:
            raise ValueError(f"speculative tree {spec!r}: give 'WxD' with W, D >= 1 (W chains "
                             f"of D tokens) or a list of parent indices")
        width, depth = int(match[1]), int(match[2])
        parents = [c * depth + j - 1 if j else -1 for c in range(width) for j in range(depth)]
    elif isinstance(spec, (list, tuple)):
        parents = list(spec)
        for i, parent in enumerate(parents):
            if not isinstance(parent, int) or isinstance(parent, bool) or not -1 <= parent < i:
                earlier = f" or an earlier node (0..{i - 1})" if i else ""
                raise ValueError(f"speculative tree {list(spec)!r} is not a tree: node {i}'s "
                                 f"parent {parent!r} must be -1 (the root){earlier}")
    else:
        raise TypeError(f"speculative tree must be 'WxD' or a list of parent indices, got "
                        f"{type(spec).__name__}")
    if not parents:
        raise ValueError("speculative tree has no nodes")
    if len(parents) > MAX_TREE_NODES:
        raise ValueError(f"speculative tree {spec!r} has {len(parents)} nodes; at most "
                         f"{MAX_TREE_NODES}")
    return TokenTree(tuple(parents))
