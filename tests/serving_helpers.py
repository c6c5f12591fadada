"""Helpers for the serving tests (test_serving, test_http, test_auth): a fixture model with a
tokenizer, a `jaxserve serve` subprocess with its output pumped into queues, metric scraping and
small waits."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
STDLIB = Path(os.__file__).parent
TOKENIZER_TEXTS = ("argparse.py", "dataclasses.py", "textwrap.py", "string.py")


def make_model_dir(converted: Path, out: Path) -> Path:
    """A copy of a converted random HF Llama (vocab 512) plus a sentencepiece tokenizer of the same
    vocabulary size, so text prompts work. (the embedded model is larger and slower to compile.)"""
    from jaxserve.text.sentencepiece_tokenizer import train_tokenizer

    shutil.copytree(converted, out)
    texts = [STDLIB / name for name in TOKENIZER_TEXTS if (STDLIB / name).is_file()]
    model = train_tokenizer(texts, out.parent / "tok", 512)
    shutil.copy(model, out / "tokenizer.model")
    return out


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def scrape(metrics_port: int, headers: dict[str, str] | None = None) -> dict[str, float]:
    """Every sample of the metrics endpoint: 'name{label="v"}' (or 'name') -> value."""
    request = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics",
                                     headers=headers or {})
    with urllib.request.urlopen(request, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class ServerProcess:
    """`python -m jaxserve.cli serve ...` with stdout / stderr lines collected by threads;
    `env` adds environment variables."""

    def __init__(self, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxserve.cli", "serve", *args],
                                     cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={**os.environ, **(env or {})})
        self.lines = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen = {"stdout": [], "stderr": []}
        for name in self.lines:
            threading.Thread(target=self._pump, args=(name,), daemon=True).start()

    def _pump(self, name: str) -> None:
        for line in getattr(self.proc, name):
            self.lines[name].put(line.rstrip("\n"))

    def wait_for(self, name: str, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines[name].get(timeout=0.1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines[name].empty():
                    break
                continue
            self.seen[name].append(line)
            if m := re.search(pattern, line):
                return m
        tail = "\n".join(self.seen["stderr"][-20:])
        raise AssertionError(f"no {pattern!r} on {name} (exit status {self.proc.poll()}); "
                             f"stderr tail:\n{tail}")

    def stderr_text(self) -> str:
        while not self.lines["stderr"].empty():
            self.seen["stderr"].append(self.lines["stderr"].get())
        return "\n".join(self.seen["stderr"])

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
