"""Two processes of 4 devices against one of 8: step time, and what the plan costs per step.

The same greedy decode workload runs on one process with 8 simulated CPU devices and on two
processes with 4 each (jax.distributed on loopback, gloo collectives; jaxserve/runtime/
distributed.py). Each configuration runs as its own subprocesses (`--worker`): warm-up once
(compiles), then a timed run. The leader reports the engine's steps, wall time per step, its host
time per step (schedule + build + dispatch, which includes sending the plan), and the plan
channel's own cost: seconds in `send` and bytes sent per step.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

from jaxserve.package_data import embedded_model


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(embedded_model()))
    p.add_argument("--meshes", default="tp=8:tp", help="MESH:RULES, separated by ;")
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=300.0, help="per configuration, seconds")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mesh", default="tp=8", help=argparse.SUPPRESS)
    p.add_argument("--rules", default="tp", help=argparse.SUPPRESS)
    p.add_argument("--coordinator", default=None, help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    """One process of a configuration; the leader returns the measurements."""
    from jaxserve import LLM, SamplingParams

    distributed = {} if args.coordinator is None else dict(
        coordinator=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id)
    llm = LLM(args.model, mesh=args.mesh, rules=args.rules, max_num_seqs=args.batch,
              max_steps_in_flight=1, compilation="on_use", compilation_cache="off",
              **distributed)
    prompts = [[(7 * i + j) % 1000 + 3 for j in range(args.prompt_len)]
               for i in range(args.batch)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # compiles every shape the run uses
    engine, channel = llm.engine, getattr(llm.runner, "channel", None)
    steps0, timers0 = engine.counters["steps"], dict(engine.timers)
    sent0 = (channel.send_s, channel.sent, channel.sent_bytes) if channel else (0.0, 0, 0)
    t0 = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    steps = engine.counters["steps"] - steps0
    host = sum(engine.timers[k] - timers0.get(k, 0.0) for k in ("schedule_s", "dispatch_s"))
    out = {"mesh": args.mesh, "processes": args.num_processes, "steps": steps,
           "step_ms": 1e3 * wall / steps, "host_ms_per_step": 1e3 * host / steps,
           "plan_send_ms_per_step": 0.0, "plan_bytes_per_step": 0, "commands_per_step": 0.0}
    if channel is not None:
        out.update(plan_send_ms_per_step=1e3 * (channel.send_s - sent0[0]) / steps,
                   commands_per_step=(channel.sent - sent0[1]) / steps,
                   plan_bytes_per_step=(channel.sent_bytes - sent0[2]) // steps)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_configuration(args, mesh: str, rules: str, processes: int) -> dict:
    devices = 8 // processes
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    base = [sys.executable, "-m", "jaxserve.bench.multihost", "--worker", "--model", args.model,
            "--mesh", mesh, "--rules", rules, "--batch", str(args.batch),
            "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
    port = _free_port()
    extra = [[] if processes == 1 else ["--coordinator", f"127.0.0.1:{port}",
                                        "--num-processes", str(processes), "--process-id", str(i)]
             for i in range(processes)]
    procs = [subprocess.Popen(base + e, env=env, stdout=subprocess.PIPE, text=True)
             for e in extra]
    try:
        leader_out, _ = procs[0].communicate(timeout=args.timeout)
        for p in procs[1:]:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    lines = [line for line in leader_out.splitlines() if line.startswith("{")]
    if procs[0].returncode != 0 or not lines:
        raise RuntimeError(f"{processes} x {devices} {mesh}: exit {procs[0].returncode}")
    return json.loads(lines[-1])


def markdown(results: list[dict], args) -> str:
    rows = ["| mesh | processes x devices | steps | step (ms) | host per step (ms) | plan send "
            "per step (ms) | plan bytes per step | programs sent per step |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['mesh']} | {r['processes']} x {8 // r['processes']} | {r['steps']} | "
                    f"{r['step_ms']:.2f} | {r['host_ms_per_step']:.2f} | "
                    f"{r['plan_send_ms_per_step']:.3f} | {r['plan_bytes_per_step']} | "
                    f"{r['commands_per_step']:.2f} |")
    return (f"batch {args.batch}, prompt {args.prompt_len} tokens, {args.max_tokens} greedy "
            f"tokens each, one step in flight, embedded tiny model\n\n" + "\n".join(rows))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        print(json.dumps(result), flush=True)
        return 0
    results = []
    for spec in args.meshes.split(";"):
        mesh, _, rules = spec.partition(":")
        for processes in (1, 2):
            results.append(run_configuration(args, mesh, rules or "tp", processes))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
