"""What a compiled program's collectives move, read from its optimised HLO text
(`compiled.as_text()`): per collective op, how many there are and the bytes their results take
per device. The notebooks and the sampling benchmark read programs with it."""

from __future__ import annotations

import re
from collections import Counter

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "reduce-scatter", "collective-permute")
ITEMSIZE = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def collectives(hlo_text: str) -> dict[str, tuple[int, int]]:
    """Collective ops in optimised HLO text: op -> (count, bytes of their results)."""
    count, nbytes = Counter(), Counter()
    for line in hlo_text.splitlines():
        m = _OP.search(line)
        if m:
            op = m.group(2)
            count[op] += 1
            for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
                size = 1
                for d in filter(None, dims.split(",")):
                    size *= int(d)
                nbytes[op] += size * ITEMSIZE.get(dtype, 4)
    return {op: (count[op], nbytes[op]) for op in count}
