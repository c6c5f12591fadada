"""The scheduler's update half: a step's read-back tokens applied to their sequences, the stops a
token id decides, and the slot and blocks a finished sequence gives back. No device: a real
scheduler over real block and slot pools, driven the way the engine drives it.

Oracle: the stop rules as the sampling parameters state them (EOS once min_tokens is reached
unless ignore_eos, stop_token_ids, max_tokens, a full context).
"""

import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.config import ModelConfig
from jaxserve.engine.block_pool import BlockPool, identity_hash
from jaxserve.engine.id_pool import IdPool
from jaxserve.engine.router import make_policy
from jaxserve.engine.scheduler import Scheduler
from jaxserve.engine.sequence import Request, Status, TokenStop
from jaxserve.package_data import embedded_model
from jaxserve.settings import SchedulerSettings

TINY = embedded_model()
EOS = (2,)
BLOCK = 4
MAX_MODEL_LEN = 32


@pytest.fixture
def scheduler():
    config = ModelConfig.load(TINY / "config.json")
    limits = SchedulerSettings(max_num_batched_tokens=64, max_prefill_chunk=32,
                               max_prefill_rows=4)
    return Scheduler(limits, [BlockPool(16, BLOCK, True)], [IdPool(range(4))], tile=16,
                     router=make_policy("prefix", config, 64), model_config=config,
                     root_hash=identity_hash("test"))


def running(scheduler, params, prompt=(5, 6, 7, 8, 9), request_id="r"):
    """A request whose first step (its whole prompt) is planned and dispatched."""
    request = Request(request_id, list(prompt), params, [0] * params.n, MAX_MODEL_LEN)
    for seq in request.sequences:
        scheduler.add(seq)
    scheduler.commit(scheduler.schedule(can_preempt=True))
    assert all(seq.status is Status.RUNNING for seq in request.sequences)
    return request


def step(scheduler, seq, token):
    """The engine's readback of one decode row; the next step planned and committed."""
    update = scheduler.update([(0, seq)], np.array([token], np.int32), EOS)
    scheduler.commit(scheduler.schedule(can_preempt=True))
    return update


def test_tokens_are_appended_until_a_stop_token_finishes_and_frees_the_sequence(scheduler):
    seq = running(scheduler, SamplingParams(max_tokens=10, stop_token_ids=[9])).sequences[0]
    for token in (11, 12):
        update = step(scheduler, seq, token)
        assert (update.generated, update.discarded) == (1, 0)
        assert update.sampled[0].stop is None and update.sampled[0].token == token
    assert scheduler.pools[0].num_used > 0 and scheduler.slots[0].num_free == 3
    update = step(scheduler, seq, 9)
    assert update.sampled[0].stop == TokenStop("stop", 9)
    assert update.sampled[0].index == 3 and seq.output_ids == [11, 12, 9]
    assert seq.status is Status.FINISHED and seq not in scheduler.running
    assert scheduler.pools[0].num_used == 0 and scheduler.slots[0].num_free == 4
    # a token sampled for it by a step that was in flight is dropped
    late = scheduler.update([(0, seq)], np.array([13], np.int32), EOS)
    assert (late.sampled, late.generated, late.discarded) == ([], 0, 1)
    assert seq.output_ids == [11, 12, 9]


def test_eos_stops_only_after_min_tokens_and_never_with_ignore_eos(scheduler):
    seq = running(scheduler, SamplingParams(max_tokens=10, min_tokens=2)).sequences[0]
    assert step(scheduler, seq, EOS[0]).sampled[0].stop is None  # 1 < min_tokens
    assert step(scheduler, seq, EOS[0]).sampled[0].stop == TokenStop("stop")
    other = running(scheduler, SamplingParams(max_tokens=3, ignore_eos=True),
                    request_id="o").sequences[0]
    assert [step(scheduler, other, EOS[0]).sampled[0].stop for _ in range(3)] == \
        [None, None, TokenStop("length", text_stop_wins=True)]


def test_a_full_context_is_a_length_stop(scheduler):
    prompt = tuple(range(3, 3 + MAX_MODEL_LEN - 2))  # room for two outputs
    seq = running(scheduler, SamplingParams(), prompt).sequences[0]
    assert step(scheduler, seq, 11).sampled[0].stop is None
    assert step(scheduler, seq, 12).sampled[0].stop == TokenStop("length", text_stop_wins=True)


def test_a_late_stop_drops_the_tokens_after_it_and_finishes_the_sequence(scheduler):
    seq = running(scheduler, SamplingParams(max_tokens=10)).sequences[0]
    for token in (11, 12, 13, 14):
        step(scheduler, seq, token)
    assert scheduler.stop_late(seq, 2) == 2
    assert seq.output_ids == [11, 12] and seq.status is Status.FINISHED
    assert scheduler.pools[0].num_used == 0 and scheduler.slots[0].num_free == 4
    assert scheduler.stop_late(seq, 2) == 0  # applied once
