"""Reading a compiled program's collectives from its HLO text (jaxserve.bench.hlo): counts and
the bytes their results take, on hand-written lines and on a program XLA partitioned."""

import numpy as np

from jaxserve.bench.hlo import collectives
from jaxserve.bench.sampling import gathered_bytes

HLO = """
  %all-gather.1 = f32[8,16]{1,0} all-gather(f32[4,16]{1,0} %p), dimensions={0}
  %ags = (bf16[2,3]{1,0}, s32[5]{0}) all-gather-start(bf16[1,3]{1,0} %a, s32[5]{0} %b)
  %agd = (bf16[2,3]{1,0}, s32[5]{0}) all-gather-done(%ags)
  %a2a = f32[2,4]{1,0} all-to-all(f32[2,4]{1,0} %x), dimensions={0}
  %ar = pred[7]{0} all-reduce(pred[7]{0} %y), to_apply=%or
  %add = f32[8,16]{1,0} add(%all-gather.1, %all-gather.1)
"""


def test_collectives_count_ops_and_result_bytes():
    assert collectives(HLO) == {"all-gather": (2, 8 * 16 * 4 + 2 * 3 * 2 + 5 * 4),
                                "all-to-all": (1, 2 * 4 * 4), "all-reduce": (1, 7)}
    assert gathered_bytes(HLO) == {"all-gather": 512 + 12 + 20, "all-to-all": 32}
    assert gathered_bytes("%r = f32[2]{0} reduce(%a)") == {"all-gather": 0, "all-to-all": 0}


def test_a_partitioned_program_shows_its_all_gather():
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    x = jax.device_put(jnp.ones((8, 16), jnp.float32), NamedSharding(mesh, PartitionSpec("x")))
    whole = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, PartitionSpec()))
    found = collectives(whole.lower(x).compile().as_text())
    assert found["all-gather"] == (1, 8 * 16 * 4)
