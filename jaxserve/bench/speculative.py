"""Speculative decoding against plain decoding: ms per output token and tokens/s at each batch
size for plain / draft / draft on a device of its own / ngram / ngram with a token tree, with
the acceptance rate and tokens per verify step beside each; useless drafts (a random-init
draft of the same vocabulary, default settings: the auto fallback on) against plain; and the
cost per token (device-seconds per output token) at tp = 1, 2, 4 with and without speculation
(`scripts/bench_spec.py`).

Each engine generates the same greedy continuations 1 + REPEATS times, the prefix cache
emptied between, the engines of a table taking turns run by run; the fastest timed run
counts. Programs compile when first used (`compilation="on_use"`), so the first
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
REPEATS = 5  # timed runs; the fastest is kept (other work on a shared host only slows a run)


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


def timed_generate(llms: list, prompts, params) -> list[tuple[list[list[int]], float, dict]]:
    """Per engine: tokens, seconds (the fastest of REPEATS identical runs after one that
    compiles) and the stats' changes over one run. Several engines take turns run by run, so
    whatever else loads the host falls on each alike."""
    for llm in llms:
        llm.generate(prompts, params, use_tqdm=False)  # compiles the shapes the timed runs use
        llm.engine.clear_prefix_cache()  # a timed run prefills what the first did: same shapes
    before = [llm.stats() for llm in llms]
    seconds: list[list[float]] = [[] for _ in llms]
    outs: list = [None] * len(llms)
    for _ in range(REPEATS):
        for i, llm in enumerate(llms):
            t0 = time.perf_counter()
            outs[i] = llm.generate(prompts, params, use_tqdm=False)
            seconds[i].append(time.perf_counter() - t0)
            llm.engine.clear_prefix_cache()
    results = []
    for llm, was, took, out in zip(llms, before, seconds, outs):
        after = llm.stats()
        delta = {key: (after[key] - was[key]) / REPEATS for key in
                 ("spec_proposed_tokens", "spec_accepted_tokens", "spec_verify_runs",
                  "spec_fallback_sequences", "spec_fallback_untried") if key in after}
        results.append(([r.outputs[0].token_ids for r in out], min(took), delta))
    return results


def measure(llms, prompts, params) -> dict | list[dict]:
    """One engine's row, or (a list of engines, measured by turns) one row each."""
    rows = []
    for tokens, seconds, delta in timed_generate(llms if isinstance(llms, list) else [llms],
                                                 prompts, params):
        count = sum(len(t) for t in tokens)
        proposed = delta.get("spec_proposed_tokens", 0)
        accepted = delta.get("spec_accepted_tokens", 0)
        runs = delta.get("spec_verify_runs", 0)
        rows.append({"tokens": tokens, "count": count, "seconds": seconds,
                     "acceptance": accepted / proposed if proposed else None,
                     "per_step": (accepted + runs) / runs if runs else None,
                     "fallen": delta.get("spec_fallback_sequences"),
                     "untried": delta.get("spec_fallback_untried")})
    return rows if isinstance(llms, list) else rows[0]


def same_tokens(row: dict, plain: dict) -> dict:
    """`row` with `identical`: its tokens are plain decoding's."""
    return {**row, "identical": row["tokens"] == plain["tokens"]}


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

    # every method's engine at once, measured by turns (the host's load falls on each alike);
    # plain first
    llms = {name: LLM(model, speculative_config=config, **engine)
            for name, config in methods(args, 1).items()}
    results = {}
    for workload in WORKLOADS:
        for batch in args.batch:
            rows = measure(list(llms.values()), prompts(workload, batch), params)
            for name, r in zip(llms, rows):
                results[(name, workload, batch)] = same_tokens(r, rows[0])
    del llms
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

    # useless drafts, default settings (the auto fallback on), python prompts, beside plain
    # engines measured by turns with it (the host's load falls on each alike); "plain, one
    # step in flight" is what a speculative engine that proposes nothing can reach: it reads
    # every step back before planning the next
    with tempfile.TemporaryDirectory() as tmp:
        config = {"method": "draft", "model": str(random_draft(Path(tmp) / "random-draft")),
                  "num_speculative_tokens": args.num_speculative_tokens}
        llms = [LLM(model, **engine), LLM(model, max_steps_in_flight=1, **engine),
                LLM(model, speculative_config=config, **engine)]
        useless = {}
        for batch in args.batch:
            rows = measure(llms, prompts("python", batch), params)
            useless[batch] = [same_tokens(r, rows[0]) for r in rows]
        del llms
    print_markdown(
        "useless drafts: a random-init draft, python prompts, auto fallback on",
        ("batch", "plain tok/s", "plain, one step in flight", "random draft tok/s", "vs plain",
         "acceptance", "fallen back per run (untried)", "tokens = plain"),
        [(batch, f"{plain['count'] / plain['seconds']:.0f}",
          f"{serial['count'] / serial['seconds']:.0f}", f"{r['count'] / r['seconds']:.0f}",
          f"{plain['seconds'] / r['seconds']:.2f}x", fmt(r["acceptance"], ".2f"),
          f"{fmt(r['fallen'], '.1f')} ({fmt(r['untried'], '.1f')})", r["identical"])
         for batch, (plain, serial, r) in useless.items()])

    # the cost per token, batch 1, python prompts: device-seconds per output token (a draft's
    # own device counted)
    rows = []
    for tp in args.tp:
        mesh = dict(mesh=f"tp={tp}", rules="tp") if tp > 1 else {}
        # at tp > 1 plain and the draft beside it (prompt lookup is for edits; tp=1 has all)
        shown = {name: config for name, config in methods(args, tp).items()
                 if tp == 1 or not (name == "draft" or name.startswith(("ngram", "tree")))}
        if tp == 1:  # measured above
            measured = {name: results[(name, "python", 1)] for name in shown}
        else:
            llms = {name: LLM(model, speculative_config=config, **mesh,
                              **{**engine, "max_num_seqs": 1}) for name, config in shown.items()}
            measured = dict(zip(llms, measure(list(llms.values()), prompts("python", 1), params)))
            del llms
        for name, config in shown.items():
            r = measured[name]
            devices = tp + (1 if config is not None and config.get("mesh") else 0)
            rows.append((f"tp={tp}", name, devices, f"{1e3 * r['seconds'] / r['count']:.2f}",
                         f"{1e3 * devices * r['seconds'] / r['count']:.2f}",
                         fmt(r["acceptance"], ".2f")))
    print_markdown("cost per token, python prompts, batch 1",
                   ("target", "method", "devices", "ms/token", "device-ms/token", "acceptance"),
                   rows)
