"""Validate the performance model against published measurements: predicted next to published.

    python scripts/validate_published.py [--json benchmarks/validate_published.json]

Each row is a measurement a vendor or engine project published with its configuration (model,
devices, tensor parallelism, precision, batch or concurrency, prompt and output lengths); the
model predicts the same quantity from the built-in hardware profile and the model's published
config.json fields. Nothing here needs jax or a device. Kinds of rows:

  ttft        first-token latency of one prompt at batch 1: one prefill step.
  static      a static batch (all prompts prefilled in one step, then decode steps) as
              benchmark tools without in-flight batching run it: output tokens/s per GPU =
              batch x output / (prefill + (output - 1) decode steps at the mean context).
  e2e         end-to-end latency of a static batch (the same steps), ms.
  itl, ttft_c inter-token latency and first-token latency of a serving engine at a fixed
              concurrency (`jaxserve.perf.serving.colocated` with that concurrency).
  spec        tokens/s of one request decoded speculatively (`jaxserve.perf.speculative`:
              acceptance accept_pct / 100 and k proposals per step), the draft asynchronous.
  tpla        the decode step of an MLA model with its latent replicated over tp (tp_ep
              rules) over the same step with the latent split (TPLA, tp_ep with `latent` on
              tp): a speedup, at `batch` sequences of `context` tokens each.

Rows are numbered in table order (1-based); the profiles' fitted constants name the rows they
were fitted on (`jaxserve.bench.fit_published`), and the report scores the fit rows and the
held-out rows separately. The target is |error| <= 25 %; every miss is explained in
BENCHMARKS.md. Throughput rows are taken only where the table's unit is unambiguous (tok/s per
GPU, or a single GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from jaxserve.config import ModelConfig, from_hf_config
from jaxserve.perf import energy
from jaxserve.perf.precision import Precision
from jaxserve.perf.profiles import Hardware, load_hardware
from jaxserve.perf.serving import colocated
from jaxserve.perf.speculative import Speculation
from jaxserve.perf.step import Chunk, Deployment, decode_chunk
from jaxserve.perf.workload import Workload

TARGET = 0.25


def published_config(family: str, vocab: int, hidden: int, mlp: int, layers: int, heads: int,
                     kv_heads: int, max_positions: int, **moe) -> ModelConfig:
    """A model as its config.json publishes it (head_dim = hidden / heads for all of these)."""
    return ModelConfig(family=family, vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=mlp, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=max_positions, **moe)


# Architectures from the models' published config.json files: family, vocab, hidden, mlp,
# layers, heads, kv heads, max positions.
MODELS = {
    "Llama-2-7B": published_config("llama", 32000, 4096, 11008, 32, 32, 32, 4096),
    "Llama-2-13B": published_config("llama", 32000, 5120, 13824, 40, 40, 40, 4096),
    "Llama-2-70B": published_config("llama", 32000, 8192, 28672, 80, 64, 8, 4096),
    "Llama-3.1-8B": published_config("llama", 128256, 4096, 14336, 32, 32, 8, 131072),
    "Llama-3-70B": published_config("llama", 128256, 8192, 28672, 80, 64, 8, 8192),
    "Mixtral-8x7B": published_config("mixtral", 32000, 4096, 14336, 32, 32, 8, 32768,
                                     num_experts=8, num_experts_per_tok=2,
                                     moe_intermediate_size=14336, norm_topk_prob=True),
}
MODELS["Llama-3.3-70B"] = MODELS["Llama-3-70B"]
# deepseek-ai/DeepSeek-V3's config.json (the fields jaxserve reads)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "moe_layer_freq": 1, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "scoring_func": "sigmoid", "hidden_act": "silu", "max_position_embeddings": 163840,
    "rms_norm_eps": 1e-06, "rope_theta": 10000, "tie_word_embeddings": False,
    "attention_bias": False, "bos_token_id": 0, "eos_token_id": 1,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                     "type": "yarn"}}
MODELS["DeepSeek-V3"] = from_hf_config(DEEPSEEK_V3)

TRT = ("TensorRT-LLM docs/source/performance.md (NVIDIA/TensorRT-LLM, v0.6.1 release, "
       "https://github.com/NVIDIA/TensorRT-LLM/blob/release/0.6.1/docs/source/performance.md): "
       "first-token latency from v0.5, throughput from v0.6.1 (gptSessionBenchmark, static "
       "batches; H100 table in out tok/s/GPU; A100 rows used only at TP 1)")
TRT05 = ("TensorRT-LLM docs/source/performance.md at release 0.5.0 (https://raw.githubusercontent"
         ".com/NVIDIA/TensorRT-LLM/release/0.5.0/docs/source/performance.md): 'High Throughput', "
         "H100 FP8, gptSessionBenchmark static batches; TP 1 rows only (the table's out tok/s "
         "does not say per GPU)")
H200 = ("TensorRT-LLM blog 'H200 achieves nearly 12,000 tokens/sec on Llama2-13B' (https://raw."
        "githubusercontent.com/NVIDIA/TensorRT-LLM/release/0.5.0/docs/source/blogs/H200launch.md)"
        ": H200 FP8 max throughput, TensorRT-LLM v0.5.0, static batches; TP 1 rows only")
NIM = ("NVIDIA NIM for LLMs benchmarking docs, 'Performance': Llama-3.3-70B-Instruct, NIM 1.8.0, "
       "2 x H100 80GB SXM, FP8, TP2")
VLLM = ("vLLM nightly performance benchmark (buildkite vllm/performance-benchmark, build 9515): "
        "latency tests on H200, input 32, output 128, batch 8, bf16")

SWIFT = ("SwiftSpec: Ultra-Low Latency LLM Decoding by Scaling Asynchronous Speculative "
         "Decoding (Zhang et al., arXiv 2506.11309, https://arxiv.org/abs/2506.11309), abstract: "
         "'serves Llama3-70B at 348 tokens/s on 8 Nvidia Hopper GPUs' (one request). Modelled "
         "as the target at tp=4 on 4 of them, the draft asynchronous on the other 4 (off the "
         "critical path); acceptance 0.85 per proposal, k=8, prompt 512 and output 512 are "
         "assumptions (the abstract states none), bf16 on the h100 profile")

TPLA = ("TPLA: Tensor Parallel Latent Attention for Efficient Disaggregated Prefill and Decode "
        "Inference (arXiv 2508.15881, https://arxiv.org/abs/2508.15881), abstract: '1.79x and "
        "1.93x speedups, respectively, at a 32K-token context length' for DeepSeek-V3 and "
        "Kimi-K2 over MLA. Modelled as the whole decode step on 8 H200 at tp=8 (experts' width "
        "split over tp as well), fp8 weights and a bf16 cache; batch 64 is an assumption (the "
        "abstract states neither the batch nor the devices)")

SOURCES = {"TRT": TRT, "TRT05": TRT05, "H200": H200, "NIM": NIM, "VLLM": VLLM, "SWIFT": SWIFT,
           "TPLA": TPLA}
# One published measurement a line: source, model, hardware, tp, precision, kind, setting
# (NAME=VALUE,...), the published value.
PUBLISHED = """
TRT   Llama-2-7B     h100       1  float8    ttft    prompt=128                            7.0
TRT   Llama-2-7B     h100       1  float8    ttft    prompt=2048                          36.0
TRT   Llama-2-70B    h100       4  float8    ttft    prompt=128                           26.0
TRT   Llama-2-70B    h100       4  float8    ttft    prompt=2048                         109.0
TRT   Llama-2-7B     a100-80gb  1  float16   ttft    prompt=128                           16.0
TRT   Llama-2-7B     a100-80gb  1  float16   ttft    prompt=2048                         133.0
TRT   Llama-2-70B    a100-80gb  4  float16   ttft    prompt=128                           47.0
TRT   Llama-2-70B    a100-80gb  4  float16   ttft    prompt=2048                         377.0
TRT   Llama-2-7B     h100       1  float8    static  batch=768,prompt=128,output=128   19694.0
TRT   Llama-2-7B     h100       1  float8    static  batch=112,prompt=128,output=2048   6818.0
TRT   Llama-2-7B     h100       1  float8    static  batch=80,prompt=2048,output=128    2244.0
TRT   Llama-2-7B     h100       1  float8    static  batch=48,prompt=2048,output=2048   2740.0
TRT   Llama-2-70B    h100       2  float8    static  batch=1024,prompt=128,output=128   2657.0
TRT   Llama-2-70B    h100       4  float8    static  batch=480,prompt=128,output=2048   1486.0
TRT   Llama-2-70B    h100       2  float8    static  batch=96,prompt=2048,output=128     306.0
TRT   Llama-2-70B    h100       2  float8    static  batch=64,prompt=2048,output=2048    547.0
NIM   Llama-3.3-70B  h100       2  float8    ttft_c  concurrency=1,prompt=500,output=2000  47.77
NIM   Llama-3.3-70B  h100       2  float8    itl     concurrency=1,prompt=500,output=2000  18.91
NIM   Llama-3.3-70B  h100       2  float8    ttft_c  concurrency=1,prompt=5000,output=500 406.77
NIM   Llama-3.3-70B  h100       2  float8    itl     concurrency=1,prompt=5000,output=500  18.58
NIM   Llama-3.3-70B  h100       2  float8    itl     concurrency=25,prompt=5000,output=500 38.75
NIM   Llama-3.3-70B  h100       2  float8    itl     concurrency=50,prompt=5000,output=500 59.73
VLLM  Llama-3.1-8B   h200       1  bfloat16  e2e     batch=8,prompt=32,output=128          833.4
VLLM  Llama-3-70B    h200       4  bfloat16  e2e     batch=8,prompt=32,output=128         2077.5
VLLM  Mixtral-8x7B   h200       2  bfloat16  e2e     batch=8,prompt=32,output=128         1917.4
TRT   Llama-2-7B     a100-80gb  1  float16   static  batch=384,prompt=128,output=128    5586.0
TRT   Llama-2-7B     a100-80gb  1  float16   static  batch=60,prompt=128,output=2048    1928.0
TRT   Llama-2-7B     a100-80gb  1  float16   static  batch=52,prompt=2048,output=128     591.0
TRT05 Llama-2-7B     h100       1  float8    static  batch=64,prompt=128,output=128     9193.0
TRT05 Llama-2-7B     h100       1  float8    static  batch=64,prompt=128,output=2048    5367.0
TRT05 Llama-2-7B     h100       1  float8    static  batch=64,prompt=2048,output=128    2058.0
TRT05 Llama-2-7B     h100       1  float8    static  batch=32,prompt=2048,output=2048   2230.0
H200  Llama-2-13B    h200       1  float8    static  batch=1024,prompt=128,output=128  11819.0
H200  Llama-2-13B    h200       1  float8    static  batch=128,prompt=128,output=2048   4750.0
H200  Llama-2-13B    h200       1  float8    static  batch=64,prompt=2048,output=128    1349.0
H200  Llama-2-70B    h200       1  float8    static  batch=512,prompt=128,output=128    3014.0
H200  Llama-2-70B    h200       1  float8    static  batch=32,prompt=2048,output=128     303.0
SWIFT Llama-3-70B    h100       4  bfloat16  spec    prompt=512,output=512,k=8,accept_pct=85  348.0
TPLA  DeepSeek-V3    h200       8  weights=float8,kv=bfloat16,compute=bfloat16  tpla  context=32768,batch=64  1.79
"""


@dataclasses.dataclass(frozen=True)
class PublishedRow:
    """One published measurement: `number` is its 1-based place in the table, `source` the
    short name of its source (a key of SOURCES)."""

    number: int
    source: str
    model: str
    hardware: str
    tp: int
    precision: str
    kind: str
    setting: dict
    published: float

    @property
    def citation(self) -> str:
        return SOURCES[self.source]


def published_rows(table: str = PUBLISHED) -> list[PublishedRow]:
    rows = []
    for number, line in enumerate(table.strip().splitlines(), 1):
        source, model, hardware, tp, precision, kind, setting, value = line.split()
        if source not in SOURCES:
            raise ValueError(f"published row {number}: unknown source {source!r} (known: "
                             f"{', '.join(SOURCES)})")
        pairs = (item.split("=") for item in setting.split(","))
        rows.append(PublishedRow(number, source, model, hardware, int(tp), precision, kind,
                                 {k: int(v) for k, v in pairs}, float(value)))
    return rows


ROWS = published_rows()
UNITS = {"ttft": "ms", "static": "tok/s/GPU", "e2e": "ms", "itl": "ms", "ttft_c": "ms",
         "spec": "tok/s", "tpla": "x"}
WHAT = {"ttft": "first-token latency, batch 1", "static": "throughput, static batch",
        "e2e": "end-to-end latency, static batch", "itl": "inter-token latency",
        "ttft_c": "first-token latency", "spec": "speculative decoding, one request",
        "tpla": "TPLA decode-step speedup over MLA"}


def static_seconds(d: Deployment, batch: int, prompt: int, output: int) -> float:
    """Prefill of the whole batch in one step, then output - 1 decode steps (the decode step
    is linear in its context, so the mean context stands for all of them)."""
    prefill = d.step([Chunk(0, prompt, batch)]).total_s
    decode = d.step([decode_chunk(prompt + output / 2, batch)]).total_s
    return prefill + (output - 1) * decode


def deployment(row: PublishedRow, profiles: dict[str, Hardware] | None = None) -> Deployment:
    """The row's engine, on the built-in profile of its hardware or on
    `profiles[row.hardware]` where given (a profile with other constants, as the fit tries)."""
    config = MODELS[row.model]
    hardware = (profiles or {}).get(row.hardware) or load_hardware(row.hardware)
    # TP engines split each expert's width as well (the tp_ep rules at ep=1)
    mesh, rules = ((f"tp={row.tp},ep=1", "tp_ep") if config.is_moe
                   else (f"tp={row.tp}", "tp"))
    return Deployment(config, mesh, rules, hardware, Precision.parse(row.precision))


def static_joules_per_token(row: PublishedRow) -> energy.Joules | None:
    """A static-batch row's energy per output token: its prefill step and output - 1 decode
    steps at the mean context, over batch x output tokens (None without energy figures)."""
    d, st = deployment(row), row.setting
    prefill = energy.step_joules(d, d.step([Chunk(0, st["prompt"], st["batch"])]))
    decode = energy.step_joules(d, d.step([decode_chunk(st["prompt"] + st["output"] / 2,
                                                        st["batch"])]))
    if prefill is None:
        return None
    return (prefill + decode.scaled(st["output"] - 1)).scaled(1 / (st["batch"] * st["output"]))


def energy_check(rows: list[PublishedRow]) -> list[dict]:
    """Static-throughput rows on profiles with energy figures: the model's joules per token
    times the published tokens/s per GPU is the power the model accounts for, set beside the
    board's maximum power (700 W TDP for h100 / h200, cited in their profiles)."""
    out = []
    for r in rows:
        if r.kind != "static":
            continue
        j = static_joules_per_token(r)
        if j is not None:
            out.append(dict(row=r.number, model=r.model, hardware=r.hardware,
                            precision=r.precision, setting=r.setting,
                            joules_per_token=j.to_dict(), watts_per_gpu=j.total * r.published))
    return out


def latent_split(d: Deployment) -> Deployment:
    """The same engine with its MLA latent split over tp (TPLA): its rules with `latent` on the
    mesh axes of the query heads."""
    rules = d.mesh.rules
    mapping = {**rules.mapping, "latent": rules.mapping["q_heads"]}
    split = dataclasses.replace(rules, name=f"{rules.name} + latent split", mapping=mapping)
    return Deployment(d.base, dict(d.mesh.shape), split, d.hardware, d.precision)


def predict(row: PublishedRow, profiles: dict[str, Hardware] | None = None) -> float:
    """The model's figure for `row` (see `deployment` for the profile it runs on)."""
    tp, kind, setting = row.tp, row.kind, row.setting
    d = deployment(row, profiles)
    if kind == "tpla":
        step = [decode_chunk(setting["context"], setting["batch"])]
        return d.step(step).total_s / latent_split(d).step(step).total_s
    if kind == "ttft":
        return d.step([Chunk(0, setting["prompt"])]).total_s * 1e3
    if kind in ("static", "e2e"):
        seconds = static_seconds(d, setting["batch"], setting["prompt"], setting["output"])
        if kind == "e2e":
            return seconds * 1e3
        return setting["batch"] * setting["output"] / seconds / tp
    w = Workload.from_dict({"prompt_len": setting["prompt"], "output_len": setting["output"],
                            "concurrency": setting.get("concurrency", 1), "max_num_seqs": 256,
                            "max_num_batched_tokens": 8192})
    if kind == "spec":  # the draft is off the critical path: only the verify steps count
        op = colocated(d, w, speculation=Speculation(setting["accept_pct"] / 100, setting["k"]))
        return 1 / op.tpot_s
    op = colocated(d, w)
    return (op.tpot_s if kind == "itl" else op.ttft_s) * 1e3


def number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def score(rows: list[PublishedRow], profiles: dict[str, Hardware] | None = None) -> list[dict]:
    """Predicted next to published for each row."""
    out = []
    for r in rows:
        predicted = predict(r, profiles)
        out.append(dict(row=r.number, source=r.citation, source_key=r.source, model=r.model,
                        hardware=r.hardware, tp=r.tp, precision=r.precision,
                        quantity=WHAT[r.kind], unit=UNITS[r.kind], setting=r.setting,
                        published=r.published, predicted=predicted,
                        error=predicted / r.published - 1))
    return out


def within(scored: list[dict], target: float = TARGET) -> int:
    return sum(abs(r["error"]) <= target for r in scored)


def table(scored: list[dict]) -> str:
    lines = ["| # | source | model | hardware | TP | precision | quantity | setting | published "
             "| predicted | error |", "|---:|---|---|---|---:|---|---|---|---:|---:|---:|"]
    for r in scored:
        lines.append(f"| {r['row']} | {r['source_key']} | {r['model']} | {r['hardware']} | "
                     f"{r['tp']} | {r['precision']} | {r['quantity']} ({r['unit']}) | "
                     + ", ".join(f"{k} {v}" for k, v in r["setting"].items())
                     + f" | {number(r['published'])} | {number(r['predicted'])} | "
                       f"{r['error']:+.0%} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    out = score(ROWS)
    print(table(out))
    print(f"\n{within(out)} of {len(out)} rows within {TARGET:.0%}")
    watts = energy_check(ROWS)
    print("\nenergy the model accounts for at the published throughput (static rows, profiles "
          "with energy figures; the boards' maximum is 700 W):\n| # | model | hardware | "
          "setting | mJ/token (FLOP/HBM/link) | W per GPU |\n|---:|---|---|---|---:|---:|")
    for w in watts:
        j = w["joules_per_token"]
        print(f"| {w['row']} | {w['model']} | {w['hardware']} | "
              + ", ".join(f"{k} {v}" for k, v in w["setting"].items())
              + f" | {j['total'] * 1e3:.3g} ({j['compute'] * 1e3:.3g}/{j['memory'] * 1e3:.3g}/"
                f"{j['interconnect'] * 1e3:.3g}) | {w['watts_per_gpu']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"sources": SOURCES, "rows": out, "energy": watts},
                                        indent=2) + "\n")
    return out
