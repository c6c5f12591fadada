"""The recipe that trains the embedded draft model `jaxserve/checkpoints/tiny-draft/` (a 1-layer
Llama that proposes tokens for the embedded model in speculative decoding;
`scripts/train_tiny.py --draft` runs it).

Same tokenizer (the target's `tokenizer.model`, copied), same corpus and windows as the target's
recipe (jaxserve/bench/training.py: this Python's top-level stdlib files, every 16th held out),
the same architecture with `DRAFT_LAYERS` layers. Two choices make a 1-layer model a useful
drafter in a few CPU minutes:

- it starts from the target: embeddings (tied with the LM head), the final norm and the first
  layer are the target's own, so it begins as "the target truncated to one layer";
- it is distilled: the loss is the cross-entropy against the target's next-token distribution
  on the same windows (the target runs forward in the same compiled step), not against the
  corpus' next tokens. What counts for acceptance is agreeing with the target, not the data.
  (Half of each batch from the target's own greedy continuations instead was tried: agreement on
  that text rose from 0.60 to 0.72, acceptance when serving did not: 0.49 vs 0.51 over five
  Python prompts, for twice the training time, so the recipe stays on the corpus.)

Writes OUT/config.json, OUT/tokenizer.model and OUT/params/, and reports how often the draft's
argmax equals the target's on held-out windows (greedy agreement: the acceptance rate a greedy
target sees, position by position, on text it did not write).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.bench import training
from jaxserve.checkpoint import flat_params, restore_model, save_model
from jaxserve.models import build_model
from jaxserve.sharding import Layout
from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer

DRAFT_LAYERS = 1
# From the target's weights a short schedule suffices; a higher rate undoes the copied layer.
DRAFT_TRAIN = training.TrainConfig(steps=600, lr=2e-3, warmup_steps=30)


def _start_from_target(draft_params: nnx.State, target_params: nnx.State) -> nnx.State:
    """The draft's parameters with every one the target also has (same name and shape) copied:
    embeddings, final norm, layers 0..DRAFT_LAYERS-1."""
    target = flat_params(target_params)
    pure = nnx.to_pure_dict(draft_params)

    def copy(tree, prefix=""):
        for key, value in tree.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                copy(value, name + "/")
            elif name in target and np.shape(target[name]) == np.shape(value):
                tree[key] = jnp.array(target[name], value.dtype, copy=True)  # own buffer: donated

    copy(pure)
    nnx.replace_by_pure_dict(draft_params, pure)
    return draft_params


def make_distill_step(graphdef, teacher_graphdef, tc: training.TrainConfig) -> Callable:
    """One AdamW step of the draft on soft targets: the teacher's next-token distribution."""
    def loss_fn(params, teacher_params, batch):
        teacher = nnx.merge(teacher_graphdef, teacher_params)
        soft = jax.nn.softmax(jax.lax.stop_gradient(training.forward_logits(teacher, batch)), -1)
        logp = jax.nn.log_softmax(training.forward_logits(nnx.merge(graphdef, params), batch), -1)
        return -jnp.mean(jnp.sum(soft * logp, axis=-1))

    return training.adamw_step(loss_fn, tc)


def agreement(graphdef, params, teacher_graphdef, teacher_params, stream: np.ndarray,
              tc: training.TrainConfig, windows: int = 32) -> float:
    """How often the draft's argmax is the teacher's, over fixed random held-out windows."""
    rng = np.random.default_rng(tc.seed + 1)

    def agree(p, tp, batch):
        draft = training.forward_logits(nnx.merge(graphdef, p), batch).argmax(-1)
        target = training.forward_logits(nnx.merge(teacher_graphdef, tp), batch).argmax(-1)
        return jnp.mean((draft == target).astype(jnp.float32))

    fn = jax.jit(agree)
    return float(np.mean([fn(params, teacher_params,
                             training.sample_windows(rng, stream, 8, tc.seq_len)[:, :-1])
                          for _ in range(windows // 8)]))


def train_draft(out_dir: str | Path, target_dir: str | Path, *,
                train_config: training.TrainConfig = DRAFT_TRAIN, seconds: float | None = None,
                files: list[Path] | None = None, log: Callable[[str], None] = print
                ) -> dict[str, Any]:
    """Distil a DRAFT_LAYERS-layer draft of the checkpoint `target_dir`; save it to out_dir
    (with the target's tokenizer). Returns a summary dict (losses, agreement before / after)."""
    tc = train_config
    t0 = time.perf_counter()
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    layout = Layout.create(None, "tp")
    target_config, teacher_graphdef, teacher_params = restore_model(target_dir, layout)
    tok_path = target_dir / "tokenizer.model"
    tokenizer = SentencePieceTokenizer(tok_path, bos_token_id=target_config.bos_token_id,
                                       eos_token_ids=target_config.eos_token_ids)
    train_files, held_files = training.split_files(
        training.stdlib_files() if files is None else list(files))
    held_files = held_files or train_files
    train_stream = training.token_stream(tokenizer, train_files)
    held_stream = training.token_stream(tokenizer, held_files)

    config = dataclasses.replace(target_config, num_layers=DRAFT_LAYERS)
    graphdef, params = nnx.split(build_model(config, seed=tc.seed))
    params = _start_from_target(params, teacher_params)
    before = agreement(graphdef, params, teacher_graphdef, teacher_params, held_stream, tc)
    log(f"draft: {config.num_params() / 1e6:.2f}M params, {config.num_layers} layer(s), from "
        f"{target_dir.name}; {len(train_stream)} train tokens; held-out agreement with the "
        f"target at the start {before:.3f}")

    step_fn = make_distill_step(graphdef, teacher_graphdef, tc)
    opt = training.adamw_state(params)
    rng = np.random.default_rng(tc.seed)
    total, losses, t_train = tc.steps, [], time.perf_counter()
    for step in range(total):
        if seconds is not None and time.perf_counter() - t_train > seconds:
            break
        batch = training.sample_windows(rng, train_stream, tc.batch_size, tc.seq_len)[:, :-1]
        params, opt, loss, _ = step_fn(params, opt, batch, np.float32(
            training.lr_at(step, total, tc)), teacher_params)
        losses.append(float(loss))
        if (step + 1) % tc.log_every == 0:
            log(f"  step {step + 1:5d}/{total}  distillation loss "
                f"{np.mean(losses[-tc.log_every:]):.4f}  [{time.perf_counter() - t0:.0f}s]")
    after = agreement(graphdef, params, teacher_graphdef, teacher_params, held_stream, tc)
    save_model(out_dir, config, params, tokenizer_model=tok_path)
    log(f"saved {out_dir}: held-out agreement with the target {after:.3f} (start {before:.3f}), "
        f"{len(losses)} steps [{time.perf_counter() - t0:.0f}s]")
    return {"config": config, "losses": losses, "agreement_before": before,
            "agreement": after, "seconds": time.perf_counter() - t0}
