"""Disaggregated prefill/decode against the colocated engine at equal total devices.

For each (prompt length, output length) of a small sweep, the same batch of requests runs on a
colocated engine over devices 0-1 (tp=2) and on a pair (prefill on device 0, decode on device
1) in two precisions: float32 on both sides, and bfloat16 prefill -> int8 KV decode. Reported
per run: TTFT and TPOT p50 / p99 (from each request's metrics), goodput (output tokens per
second of the requests that met the TTFT and TPOT targets), and for the pairs the handoffs'
bytes and milliseconds per request by format pair.

What shared CPU cores cannot show: simulated devices are threads of one process on the same
cores, so a prefill engine and a decode engine never run truly at once, and a device-to-device
transfer is a memory copy. Stage pressure (a long prefill stalling decodes) shows in TPOT; the
interconnect's cost does not. Run it on a quiet machine; the shapes of the curves mean more
than the numbers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from jaxserve.bench.report import local_time, write_json

ENGINE = dict(max_model_len=256, block_size=16, max_num_seqs=8, max_num_batched_tokens=128,
              max_prefill_chunk=128, kv_blocks=64)
LAYOUTS = {
    "colocated tp=2": dict(mesh="tp=2"),
    "pair f32->f32": dict(disaggregate={"prefill": {"devices": [0]},
                                        "decode": {"devices": [1]}}),
    "pair bf16->int8": dict(disaggregate={"prefill": {"devices": [0], "dtype": "bfloat16"},
                                          "decode": {"devices": [1], "kv_cache_dtype": "int8"}}),
}
SWEEP = ((96, 8), (16, 48))  # prefill-heavy, decode-heavy


def percentile(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def run_layout(llm, prompt_len: int, output_len: int, requests: int, ttft_slo: float,
               tpot_slo: float) -> dict:
    from jaxserve import SamplingParams

    rng = np.random.default_rng(prompt_len * 1000 + output_len)
    prompts = [rng.integers(3, llm.config.vocab_size, prompt_len).tolist()
               for _ in range(requests)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # compile what the sweep point needs
    before = llm.stats()
    t0 = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    ttft, tpot, good = [], [], 0
    for out in outputs:
        m, n = out.metrics, len(out.outputs[0].token_ids)
        ttft.append(m.ttft)
        per_token = (m.e2e_latency - m.ttft) / (n - 1) if n > 1 else 0.0
        tpot.append(per_token)
        if m.ttft <= ttft_slo and per_token <= tpot_slo:
            good += n
    after = llm.stats()
    result = {"prompt_len": prompt_len, "output_len": output_len, "requests": requests,
              "wall_s": round(wall, 3),
              "ttft_ms_p50": 1e3 * percentile(ttft, 50), "ttft_ms_p99": 1e3 * percentile(ttft, 99),
              "tpot_ms_p50": 1e3 * percentile(tpot, 50), "tpot_ms_p99": 1e3 * percentile(tpot, 99),
              "goodput_tok_s": round(good / wall, 2)}
    if after.get("disaggregated"):
        handoffs = after["handoffs"] - before["handoffs"]
        result.update(
            handoff_format=after["handoff_format"],
            handoff_bytes_per_request=(after["handoff_bytes"] - before["handoff_bytes"])
            // max(handoffs, 1),
            handoff_ms_per_request=round(1e3 * (after["handoff_seconds"]
                                                - before["handoff_seconds"]) / max(handoffs, 1),
                                         3),
            prefill_utilization=after["prefill_utilization"],
            decode_utilization=after["decode_utilization"])
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--requests", type=int, default=8, help="requests per sweep point")
    p.add_argument("--ttft-slo", type=float, default=2.0, help="seconds, for goodput")
    p.add_argument("--tpot-slo", type=float, default=0.2, help="seconds, for goodput")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)

    from jaxserve import LLM
    from jaxserve.package_data import embedded_model

    model_dir = args.model_dir or embedded_model()
    results = []
    for name, layout in LAYOUTS.items():
        llm = LLM(model_dir, **ENGINE, **layout)
        for prompt_len, output_len in SWEEP:
            row = {"layout": name, **run_layout(llm, prompt_len, output_len, args.requests,
                                                args.ttft_slo, args.tpot_slo)}
            results.append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    if args.json is not None:
        write_json(args.json, {"date": local_time(), "results": results})
    return results
