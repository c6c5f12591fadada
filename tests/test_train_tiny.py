"""The training recipe (jaxserve.bench.training, scripts/train_tiny.py) and the checkpoint it
produced, the embedded model (jaxserve/checkpoints/tiny/).

The training recipe runs end to end on a very small setup (a few stdlib files, a 1-layer model,
a handful of steps): the loss must fall, the checkpoint it writes must restore and its tokenizer
load. The committed checkpoint must restore, stay small, and predict unseen Python far better
than chance -- proof that it learned something and was not left at its random initialisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from jaxserve.package_data import embedded_model

REPO = Path(__file__).resolve().parent.parent
COMMITTED = embedded_model()
MAX_BYTES = 30 * 2**20

SNIPPET = '''import os
import sys


def main(argv=None):
    """Print the size of each file named on the command line."""
    if argv is None:
        argv = sys.argv[1:]
    for name in argv:
        path = os.path.join(os.getcwd(), name)
        if not os.path.exists(path):
            print("file not found: %s" % path, file=sys.stderr)
            return 1
        with open(path) as f:
            data = f.read()
        print(name, len(data))
    return 0


class Counter:
    def __init__(self, start=0):
        self.value = start

    def increment(self, step=1):
        self.value += step
        return self.value


if __name__ == "__main__":
    sys.exit(main())
'''


def test_training_reduces_loss_and_writes_a_restorable_checkpoint(tmp_path):
    from jaxserve.bench import training
    from jaxserve.checkpoint import flat_params, restore_model
    from jaxserve.sharding import Layout
    from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer

    files = training.stdlib_files(max_total_bytes=150_000)
    assert files == sorted(files, key=lambda p: p.name) and len(files) >= 2
    tc = training.TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=5,
                                log_every=10)
    model = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                 num_kv_heads=2, head_dim=16)
    out = tmp_path / "ckpt"
    result = training.train(out, train_config=tc, vocab_size=512, model_overrides=model,
                              files=files, samples=False, log=lambda line: None)

    losses = result["losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(512), abs=0.5)  # starts near chance
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0

    # in the layout training used (as declared), to compare the arrays themselves
    config, _, params = restore_model(out, Layout.create(None, "tp"), weight_layout="in_out")
    assert config == result["config"] and config.vocab_size == 512 and config.num_layers == 1
    restored, trained = flat_params(params), flat_params(result["params"])
    assert restored.keys() == trained.keys()
    for name in trained:
        np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(trained[name]),
                                      err_msg=name)

    tok = SentencePieceTokenizer(out / "tokenizer.model", bos_token_id=config.bos_token_id,
                                 eos_token_ids=config.eos_token_ids)
    assert tok.vocab_size == 512 and tok.bos_id == 1 and tok.eos_ids == (2,)
    assert tok.decode(tok.encode("def f(x):\n    return x\n")) == "def f(x):\n    return x\n"

    text = training.generate(result["graphdef"], result["params"], tok, "def ", max_new=3,
                               length=32)
    assert text.startswith("def ")


def test_committed_checkpoint_learned_python():
    from jaxserve import LLM
    from jaxserve.checkpoint import restore_model
    from jaxserve.sharding import Layout

    assert (COMMITTED / "config.json").is_file() and (COMMITTED / "tokenizer.model").is_file()
    size = sum(f.stat().st_size for f in COMMITTED.rglob("*") if f.is_file())
    assert size <= MAX_BYTES, f"the embedded model is {size / 2**20:.1f} MiB"

    config, _, _ = restore_model(COMMITTED, Layout.create(None, "tp"))
    assert config.vocab_size % 8 == 0 and config.bos_token_id == 1 and config.eos_token_ids == (2,)

    llm = LLM(COMMITTED)
    assert llm.tokenizer is not None and llm.tokenizer.vocab_size == config.vocab_size
    ids = llm.tokenizer.encode(SNIPPET)
    assert ids[0] == 1 and len(ids) <= config.max_position_embeddings
    assert llm.tokenizer.decode(ids) == SNIPPET
    logits = llm.logits([ids])[0]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1,
                                  keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.mean(logp[np.arange(len(ids) - 1), ids[1:]])
    assert nll < 3.0, f"mean next-token loss {nll:.3f} (chance: {math.log(config.vocab_size):.2f})"

    # the same checkpoint splits over tp=8 and gives the same logits
    sharded = LLM(COMMITTED, mesh="tp=8", rules="tp").logits([ids])[0]
    np.testing.assert_allclose(sharded, logits, atol=1e-3 * np.abs(logits).max())


def test_the_committed_draft_is_the_default_and_the_target_keeps_its_proposals():
    """`speculative_config={"method": "draft"}` alone runs the committed 1-layer draft
    (jaxserve/checkpoints/tiny-draft, scripts/train_tiny.py --draft): small, the target's own
    tokenizer, and a good share of its proposals kept on Python the target writes (a draft left
    at its random initialisation has almost none kept). That the tokens are plain decoding's
    whatever the draft proposes is tests/test_speculative_draft.py's."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.config import ModelConfig
    from jaxserve.package_data import embedded_draft

    draft = embedded_draft()
    size = sum(f.stat().st_size for f in draft.rglob("*") if f.is_file())
    assert size <= 4 * 2**20, f"the embedded draft is {size / 2**20:.1f} MiB"
    assert ModelConfig.load(draft / "config.json").num_layers == 1
    assert (draft / "tokenizer.model").read_bytes() == \
        (COMMITTED / "tokenizer.model").read_bytes()
    spec = LLM(COMMITTED, speculative_config={"method": "draft", "num_speculative_tokens": 3},
               max_model_len=128, max_num_seqs=1, compilation="on_use")
    assert spec.engine.proposer.runner.config.num_layers == 1
    spec.generate(["import os\nimport sys\n\n\ndef main("],
                  SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    assert spec.stats()["spec_acceptance_rate"] >= 0.3
