"""The recipe that trains the embedded model `jaxserve/checkpoints/tiny/` (scripts/train_tiny.py
runs it): a small Llama that writes Python.

Corpus: this Python's own standard library, top-level `*.py` files only, sorted by name, files
over 80 KB or not valid UTF-8 skipped, capped at 3 MB; every 16th file is held out (of tokenizer
and model training) for an eval loss. Tokenizer: a 2048-piece byte-fallback BPE
(`jaxserve.text`'s `train_tokenizer`, bos=1, eos=2). Model: a 1M-parameter Llama (`MODEL`
below) built with `jaxserve.models.build_model` and trained through jaxserve's own forward pass
-- including its paged KV cache, a scratch one per step -- with a hand-written AdamW (warmup +
cosine decay, global-norm clipping) on 1800 batches of 8 random 128-token windows (~1.8 epochs).
Everything is seeded and runs on one device, so the same Python and jax versions give the same
checkpoint; the defaults take about 5 minutes on 2 idle CPU cores (no XLA_FLAGS needed; with
simulated devices it still uses only the default one).

Writes OUT/config.json, OUT/tokenizer.model and OUT/params/ (`jaxserve.checkpoint.save_model`),
then prints the final loss and greedy / sampled continuations of a few Python prompts.
tests/test_train_tiny.py runs `train()` on a much smaller setup. Unlike the benchmark modules
of this package, this one imports jax when imported (nothing sets devices before a training run).
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxserve.checkpoint import save_model
from jaxserve.config import ModelConfig
from jaxserve.kv_cache import KVPool
from jaxserve.ops.attention import AttentionMetadata, chunk_blocks_for
from jaxserve.models import build_model
from jaxserve.text.base import Tokenizer
from jaxserve.text.sentencepiece_tokenizer import SentencePieceTokenizer, train_tokenizer

VOCAB_SIZE = 2048  # a multiple of 8, so the vocab axis splits over tp=8
# Small on purpose: in a few minutes of 2-core CPU a 1M-parameter model that sees more tokens
# beats 2-3.3M-parameter ones (hidden 192/256) that see fewer (held-out loss 3.95 vs 4.23 at equal
# CPU time, a third of the default budget).
# 8 query heads, hidden 128, mlp 352 and vocab 2048 all divide by 8, so the checkpoint also runs
# with mesh="tp=8" (the 2 kv heads are then replicated).
MODEL = dict(family="llama", hidden_size=128, intermediate_size=352, num_layers=4, num_heads=8,
             num_kv_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
             dtype="float32")
BLOCK_SIZE = 16  # of the scratch KV cache the training forward writes through
PROMPTS = ("import os\n", "def main(", "class Parser")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1800
    batch_size: int = 8  # beat 16 windows at the same number of tokens
    seq_len: int = 128  # a multiple of BLOCK_SIZE
    lr: float = 6e-3  # beat 3e-3 and 1e-2
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    seed: int = 0
    log_every: int = 50


# ---- corpus ----

def stdlib_files(max_file_bytes: int = 80_000, max_total_bytes: int = 3_000_000) -> list[Path]:
    """This Python's top-level stdlib .py files, sorted by name: a fixed, machine-free corpus."""
    root = Path(os.__file__).parent
    files, total = [], 0
    for f in sorted(root.glob("*.py"), key=lambda p: p.name):
        data = f.read_bytes()
        if not data.strip() or len(data) > max_file_bytes:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if total + len(data) > max_total_bytes:
            break
        files.append(f)
        total += len(data)
    return files


def split_files(files: list[Path], eval_every: int = 16) -> tuple[list[Path], list[Path]]:
    """(train, held out): every `eval_every`-th file is held out of both tokenizer and model."""
    held = [f for i, f in enumerate(files) if i % eval_every == eval_every - 1]
    return [f for f in files if f not in held], held


def strip_training_paths(model_path: Path) -> None:
    """Drop the training file paths and output prefix sentencepiece records in the model.

    They are machine- and run-specific (a temp dir, this Python's install path) and unused when
    encoding, so without them the same corpus gives a byte-identical tokenizer.model anywhere.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # no protobuf runtime: keep the file as it is
        return
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    del proto.trainer_spec.input[:]
    proto.trainer_spec.model_prefix = model_path.stem
    model_path.write_bytes(proto.SerializeToString())


def token_stream(tokenizer: Tokenizer, files: list[Path]) -> np.ndarray:
    """All files as one id stream: BOS + file + EOS, one after the other."""
    eos = tokenizer.eos_ids[0]
    ids: list[int] = []
    for f in files:
        ids += tokenizer.encode(f.read_text(encoding="utf-8"), add_bos=True) + [eos]
    return np.asarray(ids, np.int32)


def sample_windows(rng: np.random.Generator, stream: np.ndarray, batch: int, length: int
                   ) -> np.ndarray:
    """`batch` random windows of `length + 1` tokens (inputs and their next-token targets)."""
    starts = rng.integers(0, len(stream) - length - 1, size=batch)
    return np.stack([stream[s:s + length + 1] for s in starts])


# ---- the model's forward, through a scratch paged KV cache ----

def forward_logits(model, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] (T a multiple of BLOCK_SIZE) -> float32 logits [B, T, vocab].

    The rows are one flat step of B query tiles of T tokens; each row gets its own fresh blocks
    1.. of a zeroed cache (block 0 is the null block that padding, position -1, writes to), and
    the context loop has a static trip count, so gradients flow through the page scatter and
    gather.
    """
    b, t = tokens.shape
    nb = t // BLOCK_SIZE
    cfg = model.config
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    dtype = model.embed.embedding[...].dtype
    kv = KVPool.create_local(model.cache_spec(cfg, dtype), 1 + b * nb, BLOCK_SIZE)
    tables = 1 + jnp.arange(b * nb, dtype=jnp.int32).reshape(b, nb)
    cb = chunk_blocks_for(BLOCK_SIZE)
    width = -(-nb // cb) * cb
    tables = jnp.pad(tables, ((0, 0), (0, width - nb)))
    valid = positions >= 0
    pos = jnp.where(valid, positions, 0)
    slots = jnp.where(valid, jnp.take_along_axis(tables, pos // BLOCK_SIZE, axis=1) * BLOCK_SIZE
                      + pos % BLOCK_SIZE, 0)
    metadata = AttentionMetadata(positions=positions.reshape(-1), slots=slots.reshape(-1),
                                 block_tables=tables, context_lens=jnp.full((b,), t, jnp.int32),
                                 decode_rows=0, chunk_blocks=cb, static_chunks=width // cb)
    hidden, _ = model(tokens.reshape(-1), kv, metadata)
    return model.logits(hidden).reshape(b, t, -1)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# ---- AdamW by hand ----

def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup to tc.lr, then cosine decay to tc.lr * tc.min_lr_ratio at `total`.

    Warmup is at most a tenth of a (possibly time-shortened) run."""
    warmup = max(1, min(tc.warmup_steps, total // 10))
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def make_train_step(graphdef: nnx.GraphDef, tc: TrainConfig) -> Callable:
    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        return cross_entropy(forward_logits(model, batch[:, :-1]), batch[:, 1:])

    return adamw_step(loss_fn, tc)


def adamw_state(params) -> dict[str, Any]:
    return {"count": jnp.zeros((), jnp.int32),
            "mu": jax.tree.map(jnp.zeros_like, params),
            "nu": jax.tree.map(jnp.zeros_like, params)}


def adamw_step(loss_fn: Callable, tc: TrainConfig) -> Callable:
    """The jitted step (params, opt, batch, lr, *constants) -> (params, opt, loss, |g|) of
    `loss_fn(params, *constants, batch)`: AdamW with global-norm clipping."""
    def step(params, opt, batch, lr, *constants):
        loss, grads = jax.value_and_grad(loss_fn)(params, *constants, batch)
        leaves = jax.tree.leaves(grads)
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in leaves))
        scale = jnp.minimum(1.0, tc.clip_norm / (norm + 1e-6))
        grads = jax.tree.map(lambda g: g * scale, grads)
        count = opt["count"] + 1
        mu = jax.tree.map(lambda m, g: tc.beta1 * m + (1 - tc.beta1) * g, opt["mu"], grads)
        nu = jax.tree.map(lambda v, g: tc.beta2 * v + (1 - tc.beta2) * g * g, opt["nu"], grads)
        c1 = 1 - tc.beta1 ** count.astype(jnp.float32)
        c2 = 1 - tc.beta2 ** count.astype(jnp.float32)

        def update(p, m, v):
            decay = tc.weight_decay if p.ndim >= 2 else 0.0  # no decay on norm scales
            return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + tc.eps) + decay * p)

        params = jax.tree.map(update, params, mu, nu)
        return params, {"count": count, "mu": mu, "nu": nu}, loss, norm

    return jax.jit(step, donate_argnums=(0, 1))


def eval_loss(graphdef, params, stream: np.ndarray, tc: TrainConfig, windows: int = 64) -> float:
    """Mean next-token loss on `windows` fixed random windows of a held-out stream."""
    rng = np.random.default_rng(tc.seed + 1)
    fn = jax.jit(lambda p, b: cross_entropy(forward_logits(nnx.merge(graphdef, p), b[:, :-1]),
                                            b[:, 1:]))
    return float(np.mean([fn(params, sample_windows(rng, stream, 8, tc.seq_len))
                          for _ in range(windows // 8)]))


# ---- generation (a demo: full re-forward per token, one compiled shape) ----

def generate(graphdef, params, tokenizer: Tokenizer, prompt: str, max_new: int = 80,
             temperature: float = 0.0, seed: int = 0, length: int = 128) -> str:
    """prompt + up to max_new tokens, greedy (temperature 0) or sampled; stops at EOS or when
    the context reaches `length` tokens."""
    ids = tokenizer.encode(prompt, add_bos=True)
    fn = jax.jit(lambda p, t, pos: forward_logits(nnx.merge(graphdef, p), t, pos)[0])
    rng = np.random.default_rng(seed)
    eos = set(tokenizer.eos_ids)
    out: list[int] = []
    while len(out) < max_new and len(ids) < length:
        tokens = np.zeros((1, length), np.int32)
        positions = np.full((1, length), -1, np.int32)
        tokens[0, :len(ids)] = ids
        positions[0, :len(ids)] = np.arange(len(ids))
        logits = np.asarray(fn(params, tokens, positions)[len(ids) - 1], np.float64)
        if temperature > 0:
            p = np.exp((logits - logits.max()) / temperature)
            nxt = int(rng.choice(len(p), p=p / p.sum()))
        else:
            nxt = int(np.argmax(logits))
        if nxt in eos:
            break
        ids.append(nxt)
        out.append(nxt)
    return prompt + tokenizer.decode(out)


# ---- the whole recipe ----

def train(out_dir: str | Path, *, train_config: TrainConfig | None = None,
          seconds: float | None = None, vocab_size: int = VOCAB_SIZE,
          model_overrides: dict[str, Any] | None = None, files: list[Path] | None = None,
          samples: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train tokenizer + model, save the checkpoint to out_dir; return a summary dict.

    seconds: optional wall-clock budget for the training loop; once the step time is known the
    schedule is shortened to fit it (which makes the result depend on the machine's speed).
    """
    tc = train_config or TrainConfig()
    if tc.seq_len % BLOCK_SIZE:
        raise ValueError(f"seq_len must be a multiple of {BLOCK_SIZE}, got {tc.seq_len}")
    t0, cpu0 = time.perf_counter(), time.process_time()
    out_dir = Path(out_dir)
    files = stdlib_files() if files is None else list(files)
    train_files, held_files = split_files(files)
    if not held_files:  # tiny test corpora: evaluate on the training files
        held_files = train_files
    log(f"corpus: {len(train_files)} train files "
        f"({sum(f.stat().st_size for f in train_files) / 1e6:.2f} MB), {len(held_files)} held out")

    with tempfile.TemporaryDirectory() as tmp:
        tok_path = train_tokenizer(train_files, Path(tmp) / "tokenizer", vocab_size)
        strip_training_paths(tok_path)
        tokenizer = SentencePieceTokenizer(tok_path, bos_token_id=1, eos_token_ids=[2])
        train_stream = token_stream(tokenizer, train_files)
        held_stream = token_stream(tokenizer, held_files)
        log(f"tokenizer: vocab {tokenizer.vocab_size}, {len(train_stream)} train tokens "
            f"({sum(f.stat().st_size for f in train_files) / len(train_stream):.2f} bytes/token), "
            f"{len(held_stream)} held-out tokens [{time.perf_counter() - t0:.1f}s]")

        config = ModelConfig(**{**MODEL, **(model_overrides or {}), "vocab_size": vocab_size})
        model = build_model(config, seed=tc.seed)
        graphdef, params = nnx.split(model)
        log(f"model: {config.num_params() / 1e6:.2f}M params, {config.num_layers} layers, "
            f"hidden {config.hidden_size}, mlp {config.intermediate_size}")
        del model

        opt = adamw_state(params)
        step_fn = make_train_step(graphdef, tc)
        rng = np.random.default_rng(tc.seed)
        total = tc.steps
        losses: list[float] = []
        t_train = time.perf_counter()
        t_timed, timed_from = None, 5  # step time measured after compile + warm-up
        step = 0
        while step < total:
            batch = sample_windows(rng, train_stream, tc.batch_size, tc.seq_len)
            lr = np.float32(lr_at(step, total, tc))
            params, opt, loss, gnorm = step_fn(params, opt, batch, lr)
            losses.append(float(loss))
            step += 1
            if step == timed_from:
                t_timed = time.perf_counter()
            if seconds is not None and step == 2 * timed_from + 20 and t_timed is not None:
                per_step = (time.perf_counter() - t_timed) / (step - timed_from)
                left = seconds - (time.perf_counter() - t_train)
                total = max(step, min(total, step + int(left / per_step)))
                log(f"  {per_step * 1e3:.0f} ms/step: {total} steps fit in {seconds:.0f}s")
            if step % tc.log_every == 0 or step == total:
                recent = np.mean(losses[-tc.log_every:])
                log(f"  step {step:5d}/{total}  loss {recent:.4f}  lr {lr:.2e}  "
                    f"|g| {float(gnorm):.2f}  [{time.perf_counter() - t0:.0f}s]")
        train_seconds = time.perf_counter() - t_train

        final_loss = float(np.mean(losses[-min(len(losses), tc.log_every):]))
        held = eval_loss(graphdef, params, held_stream, tc)
        log(f"final train loss {final_loss:.4f} (mean of last {min(len(losses), tc.log_every)} "
            f"steps), held-out loss {held:.4f}, {step} steps in {train_seconds:.0f}s")

        save_model(out_dir, config, params, tokenizer_model=tok_path)
    log(f"saved {out_dir} [{time.perf_counter() - t0:.0f}s total, "
        f"{time.process_time() - cpu0:.0f}s CPU time]")

    texts = {}
    if samples:
        for i, prompt in enumerate(PROMPTS):
            for temp in (0.0, 0.8):
                text = generate(graphdef, params, tokenizer, prompt, temperature=temp, seed=i)
                texts[(prompt, temp)] = text
                log(f"--- {'greedy' if temp == 0 else f'sampled T={temp}'}: {prompt!r}\n{text}")
    return {"config": config, "graphdef": graphdef, "params": params, "losses": losses,
            "final_loss": final_loss, "held_out_loss": held,
            "steps": step, "train_seconds": train_seconds,
            "seconds": time.perf_counter() - t0, "samples": texts}
