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
from jaxserve.bench.report import comma_choices, fmt, local_time, print_markdown, write_json

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
# the useless-draft runs: a fallen-back engine's trials come every few requests, and a
# 64-token run at batch 1 is ~50 ms, where the host's noise is several percent
USELESS_REPEATS = 4 * REPEATS
PARTS = ("methods", "useless", "cost")  # the tables, in the order they run


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
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated parts to run, of {', '.join(PARTS)}")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    args.parts = comma_choices(p, "--parts", args.parts, PARTS)
    return args


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


def timed_generate(llms: list, prompts, params, repeats: int = REPEATS
                   ) -> list[tuple[list[list[int]], list[float], dict]]:
    """Per engine: tokens, the seconds of each of `repeats` identical runs after one that
    compiles (None for a run that compiled a program all the same: a step shape, or a draft
    round's, the first run did not use), and the stats' changes over one run. Several engines take turns run by run, so
    whatever else loads the host falls on each alike."""
    for llm in llms:
        llm.generate(prompts, params, use_tqdm=False)  # compiles the shapes the timed runs use
        llm.engine.clear_prefix_cache()  # a timed run prefills what the first did: same shapes
    before = [llm.stats() for llm in llms]
    seconds: list[list[float]] = [[] for _ in llms]
    outs: list = [None] * len(llms)
    for _ in range(repeats):
        for i, llm in enumerate(llms):
            compiled, t0 = llm.engine.programs_compiled(), time.perf_counter()
            outs[i] = llm.generate(prompts, params, use_tqdm=False)
            took = time.perf_counter() - t0
            seconds[i].append(took if llm.engine.programs_compiled() == compiled else None)
            llm.engine.clear_prefix_cache()
    results = []
    for llm, was, took, out in zip(llms, before, seconds, outs):
        after = llm.stats()
        delta = {key: (after[key] - was[key]) / repeats for key in
                 ("spec_proposed_tokens", "spec_accepted_tokens", "spec_verify_runs",
                  "spec_fallback_sequences", "spec_fallback_untried") if key in after}
        results.append(([r.outputs[0].token_ids for r in out], took, delta))
    return results


def measure(llms, prompts, params, repeats: int = REPEATS) -> dict | list[dict]:
    """One engine's row, or (a list of engines, measured by turns) one row each."""
    rows = []
    for tokens, seconds, delta in timed_generate(llms if isinstance(llms, list) else [llms],
                                                 prompts, params, repeats):
        count = sum(len(t) for t in tokens)
        # seconds: the fastest run (other work on a shared host only slows a run); mean: of all
        # that compiled nothing (what a stream of such requests sees, a fallback's trials
        # included)
        compiled = sum(s is None for s in seconds)
        seconds = [s for s in seconds if s is not None]
        if not seconds:
            raise RuntimeError(f"every one of the {compiled} timed runs compiled a program")
        proposed = delta.get("spec_proposed_tokens", 0)
        accepted = delta.get("spec_accepted_tokens", 0)
        runs = delta.get("spec_verify_runs", 0)
        rows.append({"tokens": tokens, "count": count, "seconds": min(seconds),
                     "mean_seconds": sum(seconds) / len(seconds), "runs_that_compiled": compiled,
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
    run = dict(LLM=LLM, model=model, params=params, engine=engine)
    report = {"date": local_time(), "args": {k: str(v) for k, v in vars(args).items()}}
    results = methods_part(args, **run) if "methods" in args.parts else {}
    if results:
        report["methods"] = [{"method": name, "workload": workload, "batch": batch,
                              **_kept(r)} for (name, workload, batch), r in results.items()]
    if "useless" in args.parts:
        report["useless"] = useless_part(args, **run)
    if "cost" in args.parts:
        report["cost"] = cost_part(args, results, **run)
    if args.json is not None:
        write_json(args.json, report)


def _kept(row: dict) -> dict:
    """A row as the JSON keeps it (no token lists)."""
    return {k: v for k, v in row.items() if k != "tokens"}


def prompts(workload: str, batch: int) -> list[str]:
    # distinct first lines: no prompt waits on another's blocks
    return [f"# module {i}\n" + WORKLOADS[workload] for i in range(batch)]


def methods_part(args, LLM, model, params, engine) -> dict:
    """Every method on both workloads at each batch size; returns the rows by (method,
    workload, batch)."""
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
    return results


def useless_part(args, LLM, model, params, engine) -> list[dict]:
    """Useless drafts, default settings (the auto fallback on), python prompts, beside plain
    engines measured by turns with it (the host's load falls on each alike); "plain, one step
    in flight" is what an engine that reads every step back before planning the next reaches."""
    with tempfile.TemporaryDirectory() as tmp:
        config = {"method": "draft", "model": str(random_draft(Path(tmp) / "random-draft")),
                  "num_speculative_tokens": args.num_speculative_tokens}
        llms = [LLM(model, **engine), LLM(model, max_steps_in_flight=1, **engine),
                LLM(model, speculative_config=config, **engine)]
        useless = {}
        for batch in args.batch:
            rows = measure(llms, prompts("python", batch), params, USELESS_REPEATS)
            useless[batch] = [same_tokens(r, rows[0]) for r in rows]
        del llms
    print_markdown(
        "useless drafts: a random-init draft, python prompts, auto fallback on",
        ("batch", "plain tok/s", "plain, one step in flight", "random draft tok/s", "vs plain",
         "vs plain, mean of the runs (runs left out: compiled)", "acceptance", "fallen back per run (untried)",
         "tokens = plain"),
        [(batch, f"{plain['count'] / plain['seconds']:.0f}",
          f"{serial['count'] / serial['seconds']:.0f}", f"{r['count'] / r['seconds']:.0f}",
          f"{plain['seconds'] / r['seconds']:.2f}x",
          f"{plain['mean_seconds'] / r['mean_seconds']:.2f}x "
          f"({plain['runs_that_compiled']} / {r['runs_that_compiled']})",
          fmt(r["acceptance"], ".2f"),
          f"{fmt(r['fallen'], '.1f')} ({fmt(r['untried'], '.1f')})", r["identical"])
         for batch, (plain, serial, r) in useless.items()])
    return [{"batch": batch, "plain": _kept(plain), "plain_one_in_flight": _kept(serial),
             "random_draft": _kept(r), "vs_plain": plain["seconds"] / r["seconds"],
             "vs_plain_mean": plain["mean_seconds"] / r["mean_seconds"]}
            for batch, (plain, serial, r) in useless.items()]


def cost_part(args, measured_methods: dict, LLM, model, params, engine) -> list[dict]:
    """The cost per token, batch 1, python prompts: device-seconds per output token (a
    draft's own device counted)."""
    rows, kept = [], []
    for tp in args.tp:
        mesh = dict(mesh=f"tp={tp}", rules="tp") if tp > 1 else {}
        # at tp > 1 plain and the draft beside it (prompt lookup is for edits; tp=1 has all)
        shown = {name: config for name, config in methods(args, tp).items()
                 if tp == 1 or not (name == "draft" or name.startswith(("ngram", "tree")))}
        if tp == 1 and all((name, "python", 1) in measured_methods for name in shown):
            measured = {name: measured_methods[(name, "python", 1)] for name in shown}
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
            kept.append({"tp": tp, "method": name, "devices": devices,
                         "ms_per_token": 1e3 * r["seconds"] / r["count"],
                         "device_ms_per_token": 1e3 * devices * r["seconds"] / r["count"],
                         "acceptance": r["acceptance"]})
    print_markdown("cost per token, python prompts, batch 1",
                   ("target", "method", "devices", "ms/token", "device-ms/token", "acceptance"),
                   rows)
    return kept
