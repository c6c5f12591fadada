"""Speculative decoding against plain decoding: ms per output token and tokens/s at a batch size,
with the acceptance rate and tokens per verify step beside each (`scripts/bench_spec.py`).

Each engine generates the same greedy continuations twice, the prefix cache emptied between;
the second run is timed (the first compiles the shapes the workload uses). Tokens are checked identical to plain decoding's, so a
speedup is never bought with different output. Code-editing prompts (a function repeated with
small changes) are what prompt lookup is for.
"""

from __future__ import annotations

import argparse
import time

from jaxserve.bench.report import fmt, print_table

CODE_PROMPT = '''def add(a, b):
    """Return a + b."""
    return a + b


def sub(a, b):
    """Return a - b."""
    return a - b


def mul(a, b):
'''


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    return p.parse_args(argv)


def timed_generate(llm, prompts, params) -> tuple[list[list[int]], float]:
    llm.generate(prompts, params, use_tqdm=False)  # compiles
    llm.engine.clear_prefix_cache()  # the timed run prefills what the first did: same shapes
    t0 = time.perf_counter()
    out = llm.generate(prompts, params, use_tqdm=False)
    return [r.outputs[0].token_ids for r in out], time.perf_counter() - t0


def main(args: argparse.Namespace) -> None:
    from jaxserve import LLM, SamplingParams
    from jaxserve.package_data import embedded_model

    model = args.model or embedded_model()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engine = dict(max_model_len=512, max_num_seqs=max(args.batch))
    plain = LLM(model, **engine)
    ngram = LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens":
                                           args.num_speculative_tokens}, **engine)
    for batch in args.batch:
        # distinct first lines: no prompt waits on another's blocks (timing-dependent shapes)
        prompts = [f"# module {i}\n" + CODE_PROMPT for i in range(batch)]
        want, plain_s = timed_generate(plain, prompts, params)
        before = ngram.stats()
        got, spec_s = timed_generate(ngram, prompts, params)
        after = ngram.stats()
        tokens = sum(len(t) for t in want)
        proposed = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
        accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
        runs = after["spec_verify_runs"] - before["spec_verify_runs"]
        print_table(f"batch {batch}, {tokens} tokens, k={args.num_speculative_tokens}", [
            ("plain ms/token", fmt(1e3 * plain_s / tokens, ".2f")),
            ("plain tokens/s", fmt(tokens / plain_s)),
            ("ngram ms/token", fmt(1e3 * spec_s / tokens, ".2f")),
            ("ngram tokens/s", fmt(tokens / spec_s)),
            ("speedup", fmt(plain_s / spec_s, ".2f", "x")),
            ("acceptance (this run)", fmt(accepted / proposed if proposed else None, ".3f")),
            ("tokens per verify step", fmt((accepted + runs) / runs if runs else None, ".2f")),
            ("tokens identical to plain", str(got == want))])
