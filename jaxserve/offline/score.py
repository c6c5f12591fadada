"""Offline batch scoring over JSONL files, resumable like batch generation (`generate.py`).

Input: one JSON object per line: `id` (string or integer, unique), `prompt` (text or a list of
token ids), `candidates` (a list of continuations, each text or a list of token ids; may be
omitted with top_n) and optionally `top_n` (default: --top-n).
Output: one JSON object per prompt, written and flushed as each finishes: `id`, `prompt_tokens`,
`candidates` ([{"text" (text candidates only), "token_ids", "logprob", "token_logprobs"}], in
input order) and `top` ([{"token_id", "logprob", "text"}], most likely first). Rerunning with the
same output file skips ids already there.

An entry point (used by `jaxserve score`): it validates the whole input, first alone and then
against the model, before scoring anything, and hands the rest to `LLM.score_jobs`. The file
handling is `jaxserve.offline.jsonl`'s, shared with the generation job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from jaxserve.api import MAX_TOP_N
from jaxserve.offline.jsonl import read_jsonl, run_resumable

__all__ = ["MAX_TOP_N", "ScoreItem", "check_top_n", "read_score_items", "run_score_batch"]


@dataclasses.dataclass
class ScoreItem:
    where: str  # "path:line", for errors found once the model is loaded
    id: str | int
    prompt: str | list[int]
    candidates: list[str | list[int]]
    top_n: int


def _score_fields(fields: dict, top_n: int) -> tuple[list, int]:
    candidates = fields.pop("candidates", [])
    top_n = fields.pop("top_n", top_n)
    if fields:
        raise ValueError(f"unknown field(s) {sorted(fields)}: a line has id, prompt, "
                         "candidates and top_n")
    if not isinstance(candidates, list):
        raise ValueError(f"candidates must be a list, got {type(candidates).__name__}")
    for j, candidate in enumerate(candidates):
        if not (isinstance(candidate, str) or isinstance(candidate, list)):
            raise ValueError(f"candidates[{j}] must be text or a list of token ids, got "
                             f"{candidate!r}")
    check_top_n(top_n)
    return candidates, top_n


def check_top_n(top_n, limit: int = MAX_TOP_N, what: str = "top_n") -> None:
    """`top_n` is an integer in [0, limit]: the top tokens are computed on device, at most
    MAX_TOP_N of them (and no more than the model's vocabulary)."""
    if isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {top_n!r}")
    if top_n > limit:
        raise ValueError(f"{what} must be at most {limit} (the most top tokens scoring returns"
                         f"{' for this vocabulary' if limit < MAX_TOP_N else ''}), got {top_n}")


def read_score_items(path: Path, top_n: int = 0) -> list[ScoreItem]:
    return [ScoreItem(where, item_id, prompt, *rest) for where, item_id, prompt, rest in
            read_jsonl(path, lambda fields: _score_fields(fields, top_n))]


def run_score_batch(llm, input_path: Path, output_path: Path, top_n: int = 0,
                    progress: bool = True) -> tuple[int, int]:
    """Score every item not yet in the output; returns (scored, skipped)."""
    def records(todo: list[ScoreItem]):
        limit = min(MAX_TOP_N, llm.config.vocab_size)
        for i in todo:  # the vocabulary is known once the model is loaded
            try:
                check_top_n(i.top_n, limit)
            except ValueError as e:
                raise ValueError(f"{i.where}: {e}") from None
        jobs = [llm.prepare_score(i.prompt, i.candidates, i.top_n, f"{i.where}: prompt",
                                  f"{i.where}: candidates[{{}}]") for i in todo]
        return ((index, _record(out)) for index, out in llm.score_jobs(jobs, progress))

    return run_resumable(read_score_items(Path(input_path), top_n), output_path, records)


def _record(out) -> dict:
    candidates = []
    for c in out.candidates:
        text = {"text": c.text} if c.text is not None else {}
        candidates.append({**text, "token_ids": c.token_ids, "logprob": c.logprob,
                           "token_logprobs": c.token_logprobs})
    return {"prompt_tokens": len(out.prompt_token_ids), "candidates": candidates,
            "top": [{"token_id": t.token_id, "logprob": t.logprob, "text": t.text}
                    for t in out.top]}
