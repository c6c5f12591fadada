"""The resumable JSONL file handling every offline job shares (generation and scoring).

Input: one JSON object per line with a unique `id` (string or integer) and a `prompt` (text or a
list of token ids); the job parses the other fields. Output: one JSON object per finished item,
`{"id": ..., **record}`, written and flushed as each finishes, so a killed job loses only what
was in flight; rerunning with the same output file skips ids already there.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

__all__ = ["append_records", "done_ids", "read_jsonl", "run_resumable"]

Item = TypeVar("Item")  # a job's parsed line; it has an `id`


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


def run_resumable(items: Sequence[Item], output_path: Path,
                  records: Callable[[list[Item]], Iterable[tuple[int, dict]]]) -> tuple[int, int]:
    """Run a job over the items whose ids are not in the output yet: `records(todo)` yields
    (index into todo, record) as each finishes, appended at once. Returns (done now, skipped);
    `records` is not called when nothing is left to do."""
    output_path = Path(output_path)
    done = done_ids(output_path)
    todo = [item for item in items if item.id not in done]
    if todo:
        append_records(output_path, [item.id for item in todo], records(todo))
    return len(todo), len(items) - len(todo)
