"""Offline batch generation over JSONL files, resumable.

Input: one JSON object per line: `id` (string or integer, unique), `prompt` (text or a list of
token ids), and optionally any SamplingParams field (`max_tokens`, `temperature`, ...).
Output: one JSON object per finished request: `id`, `text`, `token_ids`, `finish_reason`,
written and flushed as each request finishes, so a killed job loses only what was in flight.
Rerunning with the same output file skips ids already there.

An entry point (used by `jaxserve generate --input` and scripts/generate_batch.py): it validates
the whole input before generating anything, and hands the rest to `LLM`. `read_jsonl`,
`done_ids` and `append_records` serve every resumable JSONL job (see also batch_score.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass
class BatchItem:
    id: str | int
    prompt: str | list[int]
    params: SamplingParams


def read_jsonl(path: Path, parse_rest: Callable[[dict], Any]
               ) -> list[tuple[str, str | int, str | list[int], Any]]:
    """Every line's (where, id, prompt, parse_rest(its other fields)): ids unique strings or
    integers, prompts text or lists; errors name the line (`where` is "path:line")."""
    items, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "id" not in obj or "prompt" not in obj:
                raise ValueError(f"{where}: needs fields 'id' and 'prompt'")
            item_id, prompt = obj.pop("id"), obj.pop("prompt")
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise ValueError(f"{where}: id must be a string or integer, got {item_id!r}")
            if item_id in seen:
                raise ValueError(f"{where}: id {item_id!r} appears twice")
            seen.add(item_id)
            if not (isinstance(prompt, str) or (isinstance(prompt, list))):
                raise ValueError(f"{where}: prompt must be text or a list of token ids, "
                                 f"got {type(prompt).__name__}")
            try:
                rest = parse_rest(obj)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
            items.append((where, item_id, prompt, rest))
    return items


def read_items(path: Path, defaults: dict[str, Any]) -> list[BatchItem]:
    return [BatchItem(item_id, prompt, params) for _, item_id, prompt, params in
            read_jsonl(path, lambda fields: SamplingParams.from_dict({**defaults, **fields}))]


def done_ids(output: Path) -> set:
    """Ids already written; a torn last line (killed mid-write) is ignored and rewritten."""
    done = set()
    if output.is_file():
        with open(output, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(json.loads(line)["id"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
    return done


def _truncate_torn_line(output: Path) -> None:
    if output.is_file():
        data = output.read_bytes()
        if data and not data.endswith(b"\n"):
            output.write_bytes(data[:data.rfind(b"\n") + 1])


def append_records(output_path: Path, ids: list, records: Iterable[tuple[int, dict]]) -> None:
    """Append {"id": ids[index], **record} for each (index, record) as it comes, flushed, so a
    killed job loses only what was in flight (a torn last line is cut first)."""
    _truncate_torn_line(output_path)
    with open(output_path, "a", encoding="utf-8") as out:
        for index, record in records:
            out.write(json.dumps({"id": ids[index], **record}, ensure_ascii=False) + "\n")
            out.flush()


def run_batch(llm, input_path: Path, output_path: Path, defaults: dict[str, Any],
              progress: bool = True) -> tuple[int, int]:
    """Generate every item not yet in the output; returns (generated, skipped)."""
    items = read_items(Path(input_path), defaults)
    output_path = Path(output_path)
    done = done_ids(output_path)
    todo = [item for item in items if item.id not in done]
    if not todo:
        return 0, len(items)
    results = llm.generate_stream([i.prompt for i in todo], [i.params for i in todo],
                                  use_tqdm=progress)
    append_records(output_path, [i.id for i in todo],
                   ((index, _record(result)) for index, result in results))
    return len(todo), len(items) - len(todo)


def _record(result) -> dict:
    completion = result.outputs[0]
    record = {"text": completion.text, "token_ids": completion.token_ids,
              "finish_reason": completion.finish_reason}
    if len(result.outputs) > 1:
        record["n"] = [{"text": c.text, "token_ids": c.token_ids,
                        "finish_reason": c.finish_reason} for c in result.outputs]
    return record
