"""Other engines run on the same weights and workload, as their users run them.

HF transformers (`HFPeer`, `hf_static_batches`) is the reference today: greedy `generate` with
exactly the requested number of new tokens. A llama.cpp peer would be one more class here with
the same `generate` shape (ids in, wall seconds and new ids out). torch and transformers are
imported when a peer is built, never when this module is."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np


class HFPeer:
    """An HF transformers causal LM loaded from `hf_dir`, float32, in eval mode."""

    def __init__(self, hf_dir: Path):
        import torch
        import transformers
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32).eval()

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray | None, new_tokens: int,
                 threads: int) -> tuple[float, np.ndarray]:
        """Greedy, exactly new_tokens per row. Returns (wall seconds, new tokens [B, n])."""
        torch = self.torch
        torch.set_num_threads(threads)
        ids = torch.from_numpy(np.asarray(input_ids, np.int64))
        mask = torch.ones_like(ids) if attention_mask is None else \
            torch.from_numpy(np.asarray(attention_mask, np.int64))
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                      pad_token_id=0)
            wall = time.perf_counter() - t0
        out = out[:, ids.shape[1]:].numpy()
        assert out.shape == (ids.shape[0], new_tokens), out.shape
        return wall, out


def hf_static_batches(hf: HFPeer, prompts, out_lens, threads: int, batch: int = 8,
                      progress: bool = True):
    """Static batches in arrival order, left-padded with id 0 (as an HF user runs a varied
    workload). Returns (wall, per-request tokens, per-batch walls)."""
    tokens, walls = [], []
    n_batches = math.ceil(len(prompts) / batch)
    for k in range(0, len(prompts), batch):
        ps, ns = prompts[k:k + batch], out_lens[k:k + batch]
        width = max(len(p) for p in ps)
        ids = np.zeros((len(ps), width), np.int64)
        mask = np.zeros((len(ps), width), np.int64)
        for i, p in enumerate(ps):
            ids[i, width - len(p):] = p
            mask[i, width - len(p):] = 1
        wall, out = hf.generate(ids, mask, max(ns), threads)
        walls.append(wall)
        tokens += [out[i, :n].tolist() for i, n in enumerate(ns)]
        if progress:
            print(f"  HF mixed batch {k // batch + 1}/{n_batches}: {len(ps)} requests, "
                  f"prompts <= {width}, {max(ns)} new tokens, {wall:.1f}s", flush=True)
    return sum(walls), tokens, walls


def common_prefix(a, b) -> int:
    """How many leading tokens two outputs share (agreement with a peer)."""
    n = min(len(a), len(b))
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if diff.size else n
