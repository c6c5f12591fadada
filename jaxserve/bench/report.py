"""How benchmark results are shown and kept: the metric / value / target / verdict table,
number formatting, and JSON result files (numpy values written as plain numbers)."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import numpy as np


def fmt(x, spec=".1f", suffix=""):
    return "n/a" if x is None else format(x, spec) + suffix


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "FAIL")


def print_table(title: str, rows: list, flag: str = "") -> None:
    """rows: (metric, value[, target[, verdict]]) tuples, or None for a separator."""
    rows = [tuple(r) + ("",) * (4 - len(r)) if r else None for r in rows]
    w = [max([len(h)] + [len(str(r[i])) for r in rows if r]) for i, h in
         enumerate(("metric", "value", "target", "verdict"))]
    print(f"\n## {title}{'  [' + flag + ']' if flag else ''}")
    print(f"| {'metric':<{w[0]}} | {'value':>{w[1]}} | {'target':<{w[2]}} | "
          f"{'verdict':<{w[3]}} |")
    print(f"|{'-' * (w[0] + 2)}|{'-' * (w[1] + 1)}:|{'-' * (w[2] + 2)}|{'-' * (w[3] + 2)}|")
    for r in rows:
        if r is None:
            print(f"| {'':<{w[0]}} | {'':>{w[1]}} | {'':<{w[2]}} | {'':<{w[3]}} |")
        else:
            print(f"| {r[0]:<{w[0]}} | {str(r[1]):>{w[1]}} | {str(r[2]):<{w[2]}} | "
                  f"{str(r[3]):<{w[3]}} |")
    sys.stdout.flush()


def print_markdown(title: str, head: tuple[str, ...], rows: list[tuple]) -> None:
    """A plain markdown table: a header and one line per row (first column left-aligned)."""
    print(f"\n## {title}")
    print("| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")


def comma_choices(parser, flag: str, text: str, allowed, empty_ok: bool = False) -> list[str]:
    """The names of a comma-separated flag, each one of `allowed`, in the order given;
    `parser.error` names the first unknown one (or an empty list, unless `empty_ok`)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in allowed]
    if unknown:
        parser.error(f"{flag}: unknown {unknown[0]!r}; choose from {', '.join(allowed)}")
    if not names and not empty_ok:
        parser.error(f"{flag}: name at least one of {', '.join(allowed)}")
    return names


def json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_json(path: Path, results, indent: int = 1, default=str) -> None:
    """Write `results` to `path` (its folder made if needed) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=indent, default=default) + "\n")
    print(f"wrote {path}")


def local_time() -> str:
    """Now, in this machine's time zone, to the second (a result file's date)."""
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def settings(args) -> dict:
    """A benchmark's arguments as JSON values (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
