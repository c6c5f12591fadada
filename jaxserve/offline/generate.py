"""Offline batch generation over JSONL files, resumable.

Input: one JSON object per line: `id` (string or integer, unique), `prompt` (text or a list of
token ids), and optionally any SamplingParams field (`max_tokens`, `temperature`, ...).
Output: one JSON object per finished request: `id`, `text`, `token_ids`, `finish_reason`,
written and flushed as each request finishes, so a killed job loses only what was in flight.
Rerunning with the same output file skips ids already there.

An entry point (used by `jaxserve generate --input` and scripts/generate_batch.py): it validates
the whole input before generating anything, and hands the rest to `LLM`. The file handling is
`jaxserve.offline.jsonl`'s, shared with the scoring job.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jaxserve.offline.jsonl import read_jsonl, run_resumable
from jaxserve.sampling_params import SamplingParams

__all__ = ["BatchItem", "read_items", "run_batch"]


@dataclasses.dataclass
class BatchItem:
    id: str | int
    prompt: str | list[int]
    params: SamplingParams


def read_items(path: Path, defaults: dict[str, Any]) -> list[BatchItem]:
    return [BatchItem(item_id, prompt, params) for _, item_id, prompt, params in
            read_jsonl(path, lambda fields: SamplingParams.from_dict({**defaults, **fields}))]


def run_batch(llm, input_path: Path, output_path: Path, defaults: dict[str, Any],
              progress: bool = True) -> tuple[int, int]:
    """Generate every item not yet in the output; returns (generated, skipped)."""
    def records(todo: list[BatchItem]):
        results = llm.generate_stream([i.prompt for i in todo], [i.params for i in todo],
                                      use_tqdm=progress)
        return ((index, _record(result)) for index, result in results)

    return run_resumable(read_items(Path(input_path), defaults), output_path, records)


def _record(result) -> dict:
    completion = result.outputs[0]
    record = {"text": completion.text, "token_ids": completion.token_ids,
              "finish_reason": completion.finish_reason}
    if len(result.outputs) > 1:
        record["n"] = [{"text": c.text, "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason} for c in result.outputs]
    return record
