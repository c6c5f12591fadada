"""Batch generation over a JSONL file: the documented offline workflow.

    python scripts/generate_batch.py --input prompts.jsonl --output out.jsonl \\
        [--model DIR] [--mesh tp=2 --rules tp] [--max-tokens 128 --temperature 0]

Each input line: {"id": ..., "prompt": "text or [token ids]", optional SamplingParams fields}.
Each output line: {"id", "text", "token_ids", "finish_reason"}, appended as requests finish.
Killed? Run the same command again: ids already in the output are skipped.
Same flags as `jaxserve generate` (this is that command with --input/--output required).
"""

import sys

from jaxserve.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--input" not in argv or "--output" not in argv:
        sys.exit(__doc__)
    sys.exit(main(["generate", *argv]))
