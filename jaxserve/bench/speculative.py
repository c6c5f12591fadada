"""Speculative decoding against plain decoding: ms per output token and tokens/s at each batch
size for plain / draft / draft on a device of its own / ngram / ngram with a token tree, with
the acceptance rate and tokens per verify step beside each; useless drafts (a random-init
draft of the same vocabulary, default settings: the auto fallback on) against plain; and the
cost per token (device-seconds per output token) at tp = 1, 2, 4 with and without speculation
(`scripts/bench_spec.py`).

Each engine generates the same greedy continuations 1 + REPEATS times, the prefix cache
emptied between; the fastest timed run counts. Programs compile when first used (`compilation="on_use"`), so the first
run compiles exactly the shapes the timed one runs: with the default background warm-up a timed
step could still run in a larger shape while the rest compile, which costs several times more
on this model. Tokens are checked identical to plain decoding's, so a speedup is never bought
with different output. Two workloads: Python openings of the kind the embedded model learned
to continue (where its distilled 1-layer draft agrees with it), and code-editing prompts
(functions repeated with small changes: what prompt lookup is for). A draft on a device
of its own counts that device in the cost per token. Simulated CPU devices share the host's
cores, so a draft "beside" the target competes with it for them. The useless draft runs batch
1, then 8 on one engine, as a server would: the fallback's verdicts on the first requests
decide whether later ones try.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from jaxserve.bench.devices import simulate_cpu_devices
from jaxserve.bench.report import fmt, print_markdown

CODE_PROMPT = '''def add(a, b):
    """Return a + b."""
    return a + b


def sub(a, b):
    """Return a - b."""
    return a - b


def mul(a, b):
'''
# What the embedded model writes well (the stdlib's openings): where a draft is worth having.
PYTHON_PROMPT = "import os\nimport sys\n\n\ndef main("
WORKLOADS = {"python": PYTHON_PROMPT, "code edit": CODE_PROMPT}
DEVICES = 8  # simulated CPU devices: tp=4 and a draft of its own fit
REPEATS = 3  # timed runs; the fastest is kept (other work on a shared host only slows a run)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--draft", default=None, help="draft checkpoint (default: the embedded draft)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4],
                   help="TP degrees of the cost-per-token rows (batch 1)")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--tree", default="2x4",
                   help="the token tree of the tree rows (prompt lookup), 'WxD' or parent indices")
    p.add_argument("--max-tokens", type=int, default=64)
    return p.parse_args(argv)


def methods(args, tp: int) -> dict[str, dict | None]:
    """Speculative configs by name (None: plain), the draft on a device of its own after the
    target's `tp`."""
    k = args.num_speculative_tokens
    draft = {"method": "draft", "num_speculative_tokens": k,
             **({"model": args.draft} if args.draft else {})}
    ngram = {"method": "ngram", "num_speculative_tokens": k}
    return {"plain": None, "ngram": ngram, f"tree {args.tree}": {**ngram, "tree": args.tree},
            "draft": draft, f"draft tp=1@{tp}": {**draft, "mesh": f"tp=1@{tp}"}}


def random_draft(out: Path) -> Path:
    """A random-init model of the embedded draft's shape, vocabulary and tokenizer under
    `out`: proposals that are almost never right."""
    from flax import nnx

    from jaxserve.checkpoint import save_model
    from jaxserve.config import ModelConfig
    from jaxserve.models import build_model
    from jaxserve.package_data import embedded_draft
    from jaxserve.text.load import SP_TOKENIZER_FILE

    config = ModelConfig.load(embedded_draft() / "config.json")
    save_model(out, config, nnx.state(build_model(config, seed=0), nnx.Param),
               tokenizer_model=embedded_draft() / SP_TOKENIZER_FILE)
    return out


def timed_generate(llm, prompts, params) -> tuple[list[list[int]], float, dict]:
    """Tokens, seconds (the fastest of REPEATS identical runs after one that compiles) and the
    stats' changes over one run."""
    llm.generate(prompts, params, use_tqdm=False)  # compiles the shapes the timed runs use
    llm.engine.clear_prefix_cache()  # a timed run prefills what the first did: same shapes
    before, seconds = llm.stats(), []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        llm.engine.clear_prefix_cache()
    after = llm.stats()
    delta = {key: (after[key] - before[key]) / REPEATS for key in
             ("spec_proposed_tokens", "spec_accepted_tokens", "spec_verify_runs",
              "spec_fallback_sequences", "spec_fallback_untried") if key in after}
    return [r.outputs[0].token_ids for r in out], min(seconds), delta


def measure(llm, prompts, params, want=None) -> dict:
    tokens, seconds, delta = timed_generate(llm, prompts, params)
    count = sum(len(t) for t in tokens)
    proposed, accepted = delta.get("spec_proposed_tokens", 0), delta.get("spec_accepted_tokens", 0)
    runs = delta.get("spec_verify_runs", 0)
    return {"tokens": tokens, "count": count, "seconds": seconds,
            "acceptance": accepted / proposed if proposed else None,
            "per_step": (accepted + runs) / runs if runs else None,
            "fallen": delta.get("spec_fallback_sequences"),
            "untried": delta.get("spec_fallback_untried"),
            "identical": want is None or tokens == want}


def main(args: argparse.Namespace) -> None:
    simulate_cpu_devices(DEVICES)
    from jaxserve import LLM, SamplingParams
    from jaxserve.package_data import embedded_model

    model = args.model or embedded_model()
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    engine = dict(max_model_len=512, max_num_seqs=max(args.batch), compilation="on_use")

    def prompts(workload: str, batch: int) -> list[str]:
        # distinct first lines: no prompt waits on another's blocks
        return [f"# module {i}\n" + WORKLOADS[workload] for i in range(batch)]

    results = {}
    for name, config in methods(args, 1).items():
        llm = LLM(model, speculative_config=config, **engine)
        for workload in WORKLOADS:
            for batch in args.batch:
                want = results.get(("plain", workload, batch), {}).get("tokens")
                results[(name, workload, batch)] = measure(llm, prompts(workload, batch), params,
                                                           want)
        del llm
    for workload in WORKLOADS:
        for batch in args.batch:
            plain = results[("plain", workload, batch)]
            print_markdown(
                f"{workload} prompts, batch {batch}, {plain['count']} tokens, "
                f"k={args.num_speculative_tokens}",
                ("method", "ms/token", "tok/s", "vs plain", "acceptance", "tokens/step",
                 "tokens = plain"),
                [(name, f"{1e3 * r['seconds'] / r['count']:.2f}",
                  f"{r['count'] / r['seconds']:.0f}", f"{plain['seconds'] / r['seconds']:.2f}x",
                  fmt(r["acceptance"], ".2f"), fmt(r["per_step"], ".2f"), r["identical"])
                 for name in methods(args, 1) for r in [results[(name, workload, batch)]]])

    # useless drafts, default settings (the auto fallback on), python prompts
    with tempfile.TemporaryDirectory() as tmp:
        config = {"method": "draft", "model": str(random_draft(Path(tmp) / "random-draft")),
                  "num_speculative_tokens": args.num_speculative_tokens}
        llm = LLM(model, speculative_config=config, **engine)
        useless = {batch: measure(llm, prompts("python", batch), params,
                                  results[("plain", "python", batch)]["tokens"])
                   for batch in args.batch}
        del llm
    print_markdown(
        "useless drafts: a random-init draft, python prompts, auto fallback on",
        ("batch", "plain tok/s", "random draft tok/s", "vs plain", "acceptance",
         "fallen back per run (untried)", "tokens = plain"),
        [(batch, f"{plain['count'] / plain['seconds']:.0f}", f"{r['count'] / r['seconds']:.0f}",
          f"{plain['seconds'] / r['seconds']:.2f}x", fmt(r["acceptance"], ".2f"),
          f"{fmt(r['fallen'], '.1f')} ({fmt(r['untried'], '.1f')})", r["identical"])
         for batch, r in useless.items() for plain in [results[("plain", "python", batch)]]])

    # the cost per token, batch 1, python prompts: device-seconds per output token (a draft's
    # own device counted)
    rows = []
    for tp in args.tp:
        mesh = dict(mesh=f"tp={tp}", rules="tp") if tp > 1 else {}
        for name, config in methods(args, tp).items():
            if tp > 1 and (name == "draft" or name.startswith(("ngram", "tree"))):
                continue  # shown at tp=1; prompt lookup is for edits
            if tp == 1 and (name, "python", 1) in results:  # measured above
                r = results[(name, "python", 1)]
            else:
                llm = LLM(model, speculative_config=config, **mesh,
                          **{**engine, "max_num_seqs": 1})
                r = measure(llm, prompts("python", 1), params)
                del llm
            devices = tp + (1 if config is not None and config.get("mesh") else 0)
            rows.append((f"tp={tp}", name, devices, f"{1e3 * r['seconds'] / r['count']:.2f}",
                         f"{1e3 * devices * r['seconds'] / r['count']:.2f}",
                         fmt(r["acceptance"], ".2f")))
    print_markdown("cost per token, python prompts, batch 1",
                   ("target", "method", "devices", "ms/token", "device-ms/token", "acceptance"),
                   rows)
