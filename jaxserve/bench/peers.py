"""Other engines run on the same weights and workload, as their users run them.

HF transformers (`HFPeer`, `hf_static_batches`) is the reference: greedy `generate` with exactly
the requested number of new tokens. torch and transformers are imported when a peer is built,
never when this module is.

llama.cpp (`LlamaCppPeer`) runs as its own benchmark tool does: `llama-batched-bench` on GGUF
files converted from the same HF weights (`convert_hf_to_gguf.py --outtype f32|f16|q8_0`), B
sequences each with its own random prompt of P tokens, then N decode steps of one token per
sequence (random tokens: no sampling, no detokenization), with its default f16 KV cache. Where
it is found: the directory a caller gives (`--llama-cpp-dir`: a llama.cpp source tree with its
`build/bin/`, or a folder holding the binary), else $LLAMA_CPP_DIR, else `llama-batched-bench`
on PATH; converting needs `convert_hf_to_gguf.py` of a source tree. When either is missing
`find_llama_cpp` raises `PeerUnavailable` with what it looked for, and a benchmark skips the peer
with that message."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LLAMA_CPP_BENCH = "llama-batched-bench"
LLAMA_CPP_CONVERT = "convert_hf_to_gguf.py"
LLAMA_CPP_ENV = "LLAMA_CPP_DIR"
# GGUF weight types and their bytes per weight (q8_0: blocks of 32 int8 values + one f16 scale)
GGUF_TYPES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32}
LLAMA_CPP_KV_ITEMSIZE = 2  # llama.cpp's default KV cache type is f16


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


# ---- llama.cpp ----

class PeerUnavailable(RuntimeError):
    """A peer cannot run here; the message says what was looked for and how to provide it."""


def find_llama_cpp(directory: str | Path | None = None, environ=None) -> tuple[Path, Path]:
    """(llama-batched-bench, convert_hf_to_gguf.py): from `directory`, else $LLAMA_CPP_DIR, else
    the binary on PATH (the converter then from the source tree above it)."""
    environ = os.environ if environ is None else environ
    root = directory or environ.get(LLAMA_CPP_ENV) or None
    looked = []
    if root is not None:
        root = Path(root)
        if not root.is_dir():
            source = "--llama-cpp-dir" if directory else "$" + LLAMA_CPP_ENV
            raise PeerUnavailable(f"llama.cpp skipped: directory {str(root)!r} does not exist "
                                  f"(from {source})")
        candidates = [root / LLAMA_CPP_BENCH, root / "bin" / LLAMA_CPP_BENCH,
                      root / "build" / "bin" / LLAMA_CPP_BENCH]
        binary = next((c for c in candidates if c.is_file() and os.access(c, os.X_OK)), None)
        looked = [str(c) for c in candidates]
    else:
        found = shutil.which(LLAMA_CPP_BENCH, path=environ.get("PATH"))
        binary = Path(found) if found else None
        looked = [f"{LLAMA_CPP_BENCH} on PATH"]
    if binary is None:
        raise PeerUnavailable(
            f"llama.cpp skipped: no {LLAMA_CPP_BENCH} binary ({', '.join(looked)}); build it "
            f"(cmake --build build --target {LLAMA_CPP_BENCH} in a llama.cpp source tree) and "
            f"pass --llama-cpp-dir DIR or set ${LLAMA_CPP_ENV}")
    trees = ([root] if root is not None else []) + list(binary.resolve().parents)[:4]
    convert = next((t / LLAMA_CPP_CONVERT for t in trees if (t / LLAMA_CPP_CONVERT).is_file()),
                   None)
    if convert is None:
        raise PeerUnavailable(
            f"llama.cpp skipped: found {binary} but no {LLAMA_CPP_CONVERT} beside it (looked in "
            f"{', '.join(map(str, trees))}); pass --llama-cpp-dir with the llama.cpp source tree")
    return binary, convert


def parse_batched_bench(text: str) -> dict[int, dict]:
    """`llama-batched-bench --output-format jsonl` output -> {batch: its result line}."""
    rows = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and '"pl"' in line:
            row = json.loads(line)
            rows[int(row["pl"])] = row
    return rows


class LlamaCppPeer:
    """llama.cpp's batched benchmark on GGUF copies of an HF model's weights."""

    def __init__(self, binary: Path, convert: Path):
        self.binary, self.convert = binary, convert

    def gguf(self, hf_dir: Path, out_dir: Path, outtype: str, tokenizer_model: Path) -> Path:
        """OUT/model-OUTTYPE.gguf converted from hf_dir (once: an existing file is reused).
        A random model has no tokenizer: `tokenizer_model` (a sentencepiece model) stands in,
        beside symlinks to hf_dir's files (the converter pads its vocabulary to the model's)."""
        if outtype not in GGUF_TYPES:
            raise ValueError(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {outtype!r}")
        target = out_dir / f"model-{outtype}.gguf"
        if target.is_file():
            return target
        source = out_dir / "hf"
        source.mkdir(parents=True, exist_ok=True)
        for entry in Path(hf_dir).iterdir():
            if not (source / entry.name).exists():
                (source / entry.name).symlink_to(entry.resolve())
        if not any((source / n).exists() for n in ("tokenizer.model", "tokenizer.json")):
            (source / "tokenizer.model").symlink_to(Path(tokenizer_model).resolve())
        cmd = [sys.executable, str(self.convert), str(source), "--outtype", outtype,
               "--outfile", str(target)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not target.is_file():
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        return target

    def batched_bench(self, gguf: Path, batches: list[int], prompt: int, new: int,
                      threads: int) -> dict[int, dict]:
        """One llama-batched-bench run over every batch size: {batch: its result line}."""
        cmd = [str(self.binary), "-m", str(gguf), "-c", str(max(batches) * (prompt + new)),
               "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(new),
               "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads),
               "--output-format", "jsonl"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        rows = parse_batched_bench(done.stdout + "\n" + done.stderr)
        if done.returncode != 0 or sorted(rows) != sorted(batches):
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}; results for "
                               f"{sorted(rows)}):\n{done.stderr[-2000:]}")
        return rows
