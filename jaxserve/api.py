"""The public Python surface: `LLM` (vLLM-like). Validates what users give, hands it to the engine.

    from jaxserve import LLM
    llm = LLM("checkpoints/tiny", mesh="tp=2", rules="tp", dtype="float32")
    llm.logits([[1, 2, 3]])  # -> [np.ndarray of shape [3, vocab]]
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.checkpoint import TOKENIZER_FILE, restore_model
from jaxserve.kv_cache import NULL_BLOCK, KVCache
from jaxserve.runtime.runner import ModelRunner, bucket
from jaxserve.sharding import Layout


class LLM:
    def __init__(self, model_dir: str | Path, mesh: str | None = None, rules: str = "tp",
                 dtype: str | None = None, *, block_size: int = 16, kv_blocks: int | None = None,
                 max_model_len: int | None = None):
        """Load a jaxserve checkpoint onto a mesh.

        mesh: e.g. "tp=4" or "dp=2,tp=2"; None = one device. rules: a name in sharding_rules/ or
        a YAML path. dtype: parameter/compute dtype (default: the checkpoint's). kv_blocks: size of
        the paged KV pool in blocks of `block_size` tokens (default: room for 8 full-length
        sequences). max_model_len: longest sequence served (default: the model's limit).
        """
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.model_dir = Path(model_dir)
        self.layout = Layout.create(mesh, rules)
        self.config, graphdef, params = restore_model(self.model_dir, self.layout, dtype)
        limit = self.config.max_position_embeddings
        if max_model_len is not None and not (isinstance(max_model_len, int)
                                              and 1 <= max_model_len <= limit):
            raise ValueError(f"max_model_len must be an integer in [1, {limit}] (the model's "
                             f"max_position_embeddings), got {max_model_len!r}")
        self.max_model_len = max_model_len or limit
        if kv_blocks is None:
            kv_blocks = 1 + 8 * math.ceil(self.max_model_len / block_size)
        kv = KVCache.create(self.config, kv_blocks, block_size, jax.tree.leaves(params)[0].dtype,
                            self.layout)
        self.runner = ModelRunner(self.config, graphdef, params, self.layout, kv)
        self.tokenizer = None
        if (self.model_dir / TOKENIZER_FILE).is_file():
            from jaxserve.tokenizer import Tokenizer
            self.tokenizer = Tokenizer(self.model_dir / TOKENIZER_FILE,
                                       bos_token_id=self.config.bos_token_id,
                                       eos_token_ids=self.config.eos_token_ids or None)

    def validate_token_ids(self, token_ids: Sequence[int], what: str = "prompt") -> list[int]:
        """The one check every token-id input passes before it can reach a device."""
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
            raise TypeError(f"{what} must be a list of token ids, got {type(token_ids).__name__}")
        if len(token_ids) == 0:
            raise ValueError(f"{what} is empty")
        if len(token_ids) > self.max_model_len:
            raise ValueError(f"{what} has {len(token_ids)} tokens, more than max_model_len "
                             f"{self.max_model_len}")
        vocab = self.config.vocab_size
        for i, t in enumerate(token_ids):
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab:
                raise ValueError(f"{what}: token id {t!r} at index {i} is not in [0, {vocab})")
        return [int(t) for t in token_ids]

    def logits(self, token_id_lists: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Full-sequence logits of one prefill pass: one float32 [len, vocab] array per input."""
        seqs = [self.validate_token_ids(ids, f"input {i}") for i, ids in enumerate(token_id_lists)]
        if not seqs:
            raise ValueError("token_id_lists is empty")
        bs, pool = self.runner.block_size, self.runner.kv.num_blocks - 1
        out: list[np.ndarray] = []
        group: list[list[int]] = []
        for seq in seqs + [None]:  # as many sequences per pass as the KV pool holds
            need = sum(math.ceil(len(s) / bs) for s in group)
            if seq is None or (group and need + math.ceil(len(seq) / bs) > pool):
                out += self._logits_pass(group)
                group = []
            if seq is not None:
                group.append(seq)
        return out

    def _logits_pass(self, seqs: list[list[int]]) -> list[np.ndarray]:
        bs = self.runner.block_size
        mult = self.runner.batch_multiple()
        batch = math.ceil(bucket(len(seqs)) / mult) * mult
        seq_len = bucket(max(len(s) for s in seqs), minimum=bs)
        tokens = np.zeros((batch, seq_len), np.int32)
        positions = np.full((batch, seq_len), -1, np.int32)
        block_tables = np.full((batch, seq_len // bs), NULL_BLOCK, np.int32)
        next_block = NULL_BLOCK + 1
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq)] = seq
            positions[row, :len(seq)] = np.arange(len(seq))
            n = math.ceil(len(seq) / bs)
            block_tables[row, :n] = np.arange(next_block, next_block + n)
            next_block += n
        logits = np.asarray(self.runner.forward(tokens, positions, block_tables, all_logits=True))
        return [logits[row, :len(seq)] for row, seq in enumerate(seqs)]
