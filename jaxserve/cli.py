"""The `jaxserve` command: parse, validate, hand to the API. No engine logic lives here."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from jaxserve.config import QUANTIZATIONS
from jaxserve.package_data import embedded_model
from jaxserve.settings import (SPECULATIVE_METHODS, DisaggregationSettings, Settings,
                               SpeculativeSettings)


def _add_setting_flags(p: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """One flag per setting of the tree (jaxserve/settings.py), or of the settings `names`:
    flag, help and default come from the field, so a new setting is a new flag. Values are
    checked when the tree is built (`_settings`), so a bad one is the error `LLM` gives."""
    for leaf in Settings.leaves():
        if names is not None and leaf.name not in names:
            continue
        meta = leaf.field.metadata
        if meta["type"] is bool:  # the flag turns the default off (or on)
            p.add_argument(leaf.flag, dest=leaf.name, default=leaf.default, help=meta["help"],
                           action="store_false" if leaf.default else "store_true")
            continue
        stated = meta["default_help"] or leaf.default
        p.add_argument(leaf.flag, dest=leaf.name, type=meta["type"], default=leaf.default,
                       metavar="{" + ",".join(meta["choices"]) + "}" if meta["choices"] else None,
                       help=f"{meta['help']} (default: {stated})")


def _settings(args):
    """The settings tree from the parsed flags, validated."""
    settings = Settings().replace(**{leaf.name: getattr(args, leaf.name)
                                     for leaf in Settings.leaves() if hasattr(args, leaf.name)})
    if getattr(args, "disaggregate", None) is not None:
        settings = dataclasses.replace(
            settings, disaggregation=DisaggregationSettings.load(args.disaggregate))
    speculative = {key: getattr(args, flag) for key, flag in SPECULATIVE_FLAGS.items()
                   if getattr(args, flag, None) is not None}
    if not speculative:
        return settings
    return dataclasses.replace(settings,
                               speculative=SpeculativeSettings.from_config(speculative))


# speculative_config key -> the flag's dest (vLLM's flag names)
SPECULATIVE_FLAGS = {"method": "speculative_method", "model": "speculative_model",
                     "num_speculative_tokens": "num_speculative_tokens",
                     "mesh": "speculative_mesh", "tree": "speculative_tree"}


def _add_speculative_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative-method", choices=SPECULATIVE_METHODS, default=None,
                   help="speculative decoding: propose tokens by prompt lookup (ngram) and "
                   "verify them in one step, losslessly (default: off; ngram when "
                   "--num-speculative-tokens is given)")
    p.add_argument("--speculative-model", default=None, metavar="DIR",
                   help="draft model checkpoint (method draft)")
    p.add_argument("--speculative-mesh", default=None, metavar="AXES@FIRST",
                   help="the draft model on devices of its own, e.g. tp=1@4 (default: the "
                   "target's devices)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="proposed tokens verified per sequence and step (default: 4)")
    p.add_argument("--speculative-tree", default=None, metavar="WxD|PARENTS",
                   help="verify a token tree (method ngram): W branches of D tokens, or the "
                   "nodes' parent indices, e.g. --speculative-tree=-1,0,0 (default: one chain)")


MESH_FLAGS = ("mesh", "rules", "dtype")


def cmd_convert(args) -> int:
    from jaxserve.checkpoint import convert_hf

    config = convert_hf(args.hf, args.out, dtype=args.dtype)
    print(f"converted {args.hf} -> {args.out}: {config.family}, {config.num_layers} layers, "
          f"{config.num_params() / 1e6:.1f}M parameters, {config.dtype}")
    return 0


def cmd_quantize(args) -> int:
    from jaxserve.checkpoint import quantize_checkpoint

    config = quantize_checkpoint(args.src, args.dst, args.quantization,
                                 args.quantize_embeddings)
    embeddings = " (embedding / LM head too)" if config.quantize_embeddings else ""
    print(f"quantized {args.src} -> {args.dst}: {config.quantization}{embeddings}")
    return 0


def cmd_shard_info(args) -> int:
    import jax.numpy as jnp

    from jaxserve.checkpoint import CONFIG_FILE, param_specs, parse_dtype
    from jaxserve.config import ModelConfig
    from jaxserve.placement import fit_to_layout
    from jaxserve.sharding import Layout

    settings = _settings(args)
    base = ModelConfig.load(Path(args.model) / CONFIG_FILE)
    dtype = parse_dtype(settings.dtype, default=base.dtype)
    # planning needs no devices
    layout = Layout.create(settings.parallel.mesh, settings.parallel.rules, abstract=True)
    config = fit_to_layout(base, layout)  # the shapes the devices will hold
    itemsize = jnp.dtype(dtype).itemsize
    rows, total = [], 0
    for name, (shape, axes) in sorted(param_specs(config, dtype).items()):
        spec = layout.spec(axes, shape, f"parameter {name!r}")
        nbytes = math.prod(shape) * itemsize // layout.split_factor(spec)
        total += nbytes
        rows.append((name, "x".join(map(str, shape)), str(axes), str(spec), f"{nbytes:,}"))
    header = ("parameter", "shape", "logical axes", "PartitionSpec", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    mesh = dict(layout.mesh.shape)
    print(f"model {args.model} on mesh {mesh} with rules {layout.rules.source} ({dtype.__name__})")
    if config.vocab_rows != base.vocab_size:
        print(f"vocabulary padded from {base.vocab_size} to {config.vocab_rows} rows")
    if config.kv_head_copies > 1:
        print(f"each of the {base.num_kv_heads} KV heads repeated {config.kv_head_copies} times "
              f"({config.stored_kv_heads} stored)")
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    print(f"total per device: {total:,} bytes ({total / 2**20:.2f} MiB)")
    return 0


SAMPLING_FLAGS = {  # flag -> (SamplingParams field, type)
    "--max-tokens": ("max_tokens", int), "--temperature": ("temperature", float),
    "--top-p": ("top_p", float), "--top-k": ("top_k", int), "--min-p": ("min_p", float),
    "--seed": ("seed", int), "--repetition-penalty": ("repetition_penalty", float),
    "--presence-penalty": ("presence_penalty", float),
    "--frequency-penalty": ("frequency_penalty", float), "--min-tokens": ("min_tokens", int),
}


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(embedded_model()),
                   help="jaxserve checkpoint directory (default: the embedded tiny model)")
    _add_setting_flags(p)
    _add_speculative_flags(p)
    p.add_argument("--disaggregate", default=None, metavar="FILE",
                   help="YAML: run prompts on a prefill engine and hand each sequence's KV to "
                   "a decode engine on other devices (prefill: {mesh, devices, dtype, "
                   "kv_cache_dtype, kv_blocks}, decode: {...}, transfer, max_prefill_ahead; "
                   "see jaxserve/engine/handoff.py; default: one engine)")


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile-out", default=None, metavar="FILE.json",
                   help="write the step timeline as a Chrome trace (open in Perfetto) and print "
                   "its Amdahl table when the run ends")
    p.add_argument("--jax-profile", default=None, metavar="DIR",
                   help="capture a jax.profiler trace of a window of steps into DIR")
    p.add_argument("--jax-profile-steps", default="10:20", metavar="FIRST:COUNT",
                   help="the window --jax-profile captures: COUNT steps from step FIRST "
                   "(default 10:20)")


def _profile_window(text: str) -> tuple[int, int]:
    first, colon, count = text.partition(":")
    try:
        window = int(first), int(count)
    except ValueError:
        window = None
    if not colon or window is None or window[0] < 1 or window[1] < 1:
        raise ValueError(f"--jax-profile-steps must be FIRST:COUNT with positive integers, "
                         f"e.g. 10:20, got {text!r}")
    return window


def _start_profiling(llm, args) -> None:
    """Arm --jax-profile on the engine's timeline (after warm-up: compiling is not a step)."""
    if getattr(args, "jax_profile", None):
        llm.engine.timeline.capture_jax_profile(args.jax_profile,
                                                *_profile_window(args.jax_profile_steps))


def _finish_profiling(llm, args) -> None:
    from jaxserve.engine.timeline import format_amdahl

    llm.engine.timeline.close()
    if getattr(args, "profile_out", None):
        path = llm.engine.timeline.write_chrome_trace(args.profile_out)
        print(format_amdahl(llm.engine.timeline.summary()), file=sys.stderr)
        print(f"wrote the step timeline to {path}", file=sys.stderr)


def _make_llm(args):
    from jaxserve import LLM

    return LLM(args.model, settings=_settings(args))


def _sampling_defaults(args) -> dict:
    out = {field: getattr(args, flag[2:].replace("-", "_")) for flag, (field, _) in
           SAMPLING_FLAGS.items() if getattr(args, flag[2:].replace("-", "_")) is not None}
    if args.stop:
        out["stop"] = args.stop
    if args.ignore_eos:
        out["ignore_eos"] = True
    return out


def cmd_generate(args) -> int:
    from jaxserve import SamplingParams
    from jaxserve.offline.generate import read_items, run_batch

    if (args.prompt is None) == (args.input is None):
        raise ValueError("give exactly one of --prompt TEXT or --input FILE.jsonl")
    if args.input is not None and args.output is None:
        raise ValueError("--input needs --output FILE.jsonl")
    defaults = _sampling_defaults(args)
    if args.input is not None:
        read_items(Path(args.input), defaults)  # reject a bad file before loading the model
    _profile_window(args.jax_profile_steps)
    if args.prompt is not None and args.compilation is None:
        # One batch, then exit: a background warm-up would compile shapes this run never
        # uses and make the exit wait for its compile in progress.
        args.compilation = os.environ.get("JAXSERVE_COMPILATION") or "on_use"
    llm = _make_llm(args)
    _start_profiling(llm, args)
    try:
        if args.prompt is not None:
            params = SamplingParams.from_dict({"max_tokens": 64, **defaults})
            for out in llm.generate(args.prompt, params, use_tqdm=False):
                print(out.prompt + out.outputs[0].text)
            return 0
        generated, skipped = run_batch(llm, Path(args.input), Path(args.output), defaults,
                                       progress=not args.no_progress)
    finally:
        _finish_profiling(llm, args)
    print(f"wrote {generated} outputs to {args.output} ({skipped} already there)",
          file=sys.stderr)
    return 0


def cmd_score(args) -> int:
    from jaxserve.offline.score import check_top_n, read_score_items, run_score_batch

    check_top_n(args.top_n, what="--top-n")
    read_score_items(Path(args.input), args.top_n)  # reject a bad file before loading the model
    llm = _make_llm(args)
    scored, skipped = run_score_batch(llm, Path(args.input), Path(args.output), args.top_n,
                                      progress=not args.no_progress)
    print(f"wrote {scored} scores to {args.output} ({skipped} already there)", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from jaxserve.serving.serve import serve

    _profile_window(args.jax_profile_steps)
    served = []

    def make_llm(args):
        llm = _make_llm(args)
        served.append(llm)
        return llm

    if args.process_id:  # a follower: no front ends; runs the leader's steps, then exits
        _make_llm(args)
    try:
        return serve(args, make_llm, on_ready=lambda llm: _start_profiling(llm, args))
    finally:
        if served:  # the engine thread has stopped: the timeline is ours to read
            _finish_profiling(served[0], args)


def cmd_client(args) -> int:
    import grpc

    from jaxserve.serving.auth import api_key_from
    from jaxserve.serving.client import Client

    sampling = {field: getattr(args, flag[2:].replace("-", "_"))
                for flag, (field, _) in SAMPLING_FLAGS.items()}
    sampling.update(stop=args.stop, ignore_eos=args.ignore_eos or None)
    with Client(args.target, api_key=api_key_from(args.api_key)) as client:
        try:
            sys.stdout.write(args.prompt)  # like `generate`: prompt + completion
            for response in client.generate(args.prompt, timeout=args.timeout, **sampling):
                if response.HasField("delta"):
                    sys.stdout.write(response.delta.text)
                    sys.stdout.flush()
                else:
                    f = response.final
                    print()
                    print(f"[{f.finish_reason}: {f.usage.prompt_tokens} prompt + "
                          f"{f.usage.completion_tokens} completion tokens]", file=sys.stderr)
        except grpc.RpcError as e:
            print(f"\njaxserve client: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def cmd_plan(args) -> int:
    import dataclasses
    import json

    from jaxserve.perf.plan import SLO, load_model_config, plan
    from jaxserve.perf.precision import Precision
    from jaxserve.perf.profiles import HostOverhead, load_hardware
    from jaxserve.perf.workload import Workload

    config, name = load_model_config(args.model)
    hardware = load_hardware(args.hardware)
    for flag, value in (("--host-step-ms", args.host_step_ms), ("--host-seq-us", args.host_seq_us)):
        if value is not None and not value >= 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    if args.host_step_ms is not None or args.host_seq_us is not None:
        host = HostOverhead(
            hardware.host.per_step_s if args.host_step_ms is None else args.host_step_ms / 1e3,
            hardware.host.per_sequence_s if args.host_seq_us is None else args.host_seq_us / 1e6)
        hardware = dataclasses.replace(hardware, host=host)
    workload = Workload.load(args.workload) if args.workload else Workload()
    precision = Precision.parse(args.precision)
    decode = Precision.parse(args.decode_precision) if args.decode_precision else None
    speculation, draft = _plan_speculation(args)
    if args.disaggregate:
        result = _plan_disaggregated(args, config, name, hardware, workload)
    elif args.role_precision or args.interconnect_gbps is not None:
        raise ValueError("--role-precision and --interconnect-gbps need --disaggregate")
    else:
        result = plan(config, args.devices, hardware, workload, precision, decode,
                      SLO.parse(args.slo), disaggregated=not args.colocated_only,
                      model_name=name, speculation=speculation, draft_config=draft)
    print(result.table(args.top))
    if not result.candidates:
        print("no layout fits: " + "; ".join(f"{k}: {v}" for k, v in result.skipped.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if result.candidates else 1


def _plan_disaggregated(args, config, name, hardware, workload):
    """`plan --disaggregate`: colocated vs splits with each role's precision on its own."""
    from jaxserve.perf.disaggregate import interconnect, plan_disaggregated
    from jaxserve.perf.plan import SLO

    for flag, value in (("--colocated-only", args.colocated_only),
                        ("--decode-precision", args.decode_precision),
                        ("--speculative-acceptance", args.speculative_acceptance)):
        if value:
            raise ValueError(f"--disaggregate does not take {flag} (each role's precision is "
                             f"chosen from --role-precision)")
    link = (None if args.interconnect_gbps is None
            else interconnect(hardware, args.interconnect_gbps))
    return plan_disaggregated(config, args.devices, hardware, workload, args.role_precision,
                              SLO.parse(args.slo), link, name)


def _plan_speculation(args):
    """(Speculation or None, the draft's ModelConfig or None) from plan's flags."""
    from jaxserve.perf.plan import load_model_config
    from jaxserve.perf.speculative import Speculation

    if args.speculative_acceptance is None:
        if args.num_speculative_tokens is not None or args.speculative_model is not None:
            raise ValueError("--num-speculative-tokens and --speculative-model need "
                             "--speculative-acceptance (the acceptance rate to plan with)")
        return None, None
    speculation = Speculation(args.speculative_acceptance, args.num_speculative_tokens or 4)
    draft = load_model_config(args.speculative_model)[0] if args.speculative_model else None
    return speculation, draft


def cmd_calibrate(args) -> int:
    if args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}")
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" not in sys.modules and "device_count" not in flags:  # simulated CPU devices
        os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count="
                                   f"{args.devices}").strip()
    from jaxserve.perf.calibrate import calibrate
    from jaxserve.perf.profiles import save_hardware

    hardware = calibrate(args.name, quick=args.quick,
                         progress=lambda line: print(line, file=sys.stderr))
    save_hardware(hardware, args.out, "# Written by `jaxserve calibrate`: measured on this "
                  "machine (see `measured`), except links marked `unknown`.")
    for name in ("intra_host", "inter_host"):
        if getattr(hardware, name).unknown is not None:
            print(f"warning: the {name} link was not measured ({getattr(hardware, name).unknown}"
                  f"): written as a stand-in marked `unknown`; put a measured or published "
                  f"figure in {args.out}", file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="import an HF checkpoint (safetensors + config.json)")
    p.add_argument("--hf", required=True, help="HF model directory")
    p.add_argument("--out", required=True, help="output jaxserve checkpoint directory")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="stored dtype (default: the HF config's)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="write a float checkpoint's weights quantized (int8 + "
                       "scales); the result loads without re-quantizing")
    p.add_argument("src", help="float jaxserve checkpoint directory")
    p.add_argument("dst", help="output jaxserve checkpoint directory")
    p.add_argument("--quantization", default="int8", choices=QUANTIZATIONS,
                   help="weight format (default: int8, a scale per output channel)")
    p.add_argument("--quantize-embeddings", action="store_true",
                   help="quantize the embedding and LM head too")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("shard-info", help="show how each parameter is partitioned")
    p.add_argument("--model", required=True, help="jaxserve checkpoint directory")
    _add_setting_flags(p, MESH_FLAGS)
    p.set_defaults(func=cmd_shard_info)

    p = sub.add_parser("generate", help="generate text: one prompt, or a JSONL batch (resumable)")
    _add_engine_args(p)
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeat for several); prints prompt + completion")
    p.add_argument("--input", default=None, help="JSONL file: {id, prompt, [sampling fields]}")
    p.add_argument("--output", default=None, help="JSONL file to append results to; ids "
                   "already there are skipped")
    for flag, (_, kind) in SAMPLING_FLAGS.items():
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_profile_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("score", help="score candidate continuations of prompts from a JSONL "
                       "file: log-probs, top-N next tokens (resumable)")
    _add_engine_args(p)
    p.add_argument("--input", required=True, help="JSONL file: {id, prompt, candidates, "
                   "[top_n]}")
    p.add_argument("--output", required=True, help="JSONL file to append results to; ids "
                   "already there are skipped")
    p.add_argument("--top-n", type=int, default=0,
                   help="also return the top N next tokens after each prompt (default 0; a "
                   "line's top_n overrides it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("serve", help="serve the model over gRPC (jaxserve.v1, health, "
                       "reflection) and/or an OpenAI-compatible HTTP API, with Prometheus "
                       "metrics")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (0: pick a free one)")
    p.add_argument("--http-port", type=int, default=None,
                   help="also serve the OpenAI-compatible HTTP API (/v1/completions, "
                   "/v1/chat/completions, /v1/models, /health, /metrics) on this port "
                   "(0: pick a free one; default: off)")
    p.add_argument("--no-grpc", action="store_true",
                   help="no gRPC port: serve HTTP alone (needs --http-port)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: pick one; default: off)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond this get RESOURCE_EXHAUSTED")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds requests in flight may take before they are aborted")
    p.add_argument("--max-message-bytes", type=int, default=4 * 2**20,
                   help="largest request (gRPC message or HTTP body) accepted "
                   "(default 4 MiB)")
    p.add_argument("--warmup", action="store_true",
                   help="compile every step shape before reporting SERVING")
    auth = p.add_argument_group("authentication")
    auth.add_argument("--api-key", default=None,
                      help="require 'Authorization: Bearer KEY' (HTTP header, gRPC metadata) "
                      "on every request (default: $JAXSERVE_API_KEY, else none)")
    for flag, what in (("--auth-health", "health checks need the key too (default: open)"),
                       ("--auth-metrics", "Prometheus metrics need the key too (default: open)"),
                       ("--allow-unauthenticated",
                        "serve a non-loopback --host without an API key")):
        auth.add_argument(flag, action="store_true", help=what)
    _add_profile_args(p)
    # for tests: hold the LOADING phase / slow every engine step down
    p.add_argument("--load-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--step-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("client", help="stream a completion from a running `jaxserve serve`")
    p.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    p.add_argument("--prompt", required=True)
    for flag, (_, kind) in SAMPLING_FLAGS.items():
        p.add_argument(flag, type=kind, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--api-key", default=None,
                   help="the server's API key (default: $JAXSERVE_API_KEY)")
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("plan", help="rank layouts (replicas x TP x EP, prefill/decode splits) "
                       "of a model on G devices with the analytical performance model")
    p.add_argument("--model", required=True, help="jaxserve checkpoint directory, its "
                   "config.json, or an HF config.json (or a directory holding one)")
    p.add_argument("--devices", type=int, required=True, help="number of devices (G)")
    p.add_argument("--hardware", default="h100", help="profile name in jaxserve/perf/hardware/ "
                   "(h100, h200, a100-80gb, tpu-v5e, tpu-v5p, cpu-local) or a YAML path")
    p.add_argument("--workload", default=None, help="workload YAML/JSON (prompt_len, "
                   "output_len, prefix_hit_rate, concurrency or rate, max_num_seqs, "
                   "max_num_batched_tokens; see README)")
    p.add_argument("--slo", default=None, help="latency targets, e.g. 'ttft=500ms,tpot=50ms'")
    p.add_argument("--precision", default="bfloat16", help="bfloat16, float8, ... or "
                   "'weights=int8,kv=float8,compute=bfloat16' (default bfloat16)")
    p.add_argument("--decode-precision", default=None,
                   help="the decode engines' precision in prefill/decode splits "
                   "(default: --precision)")
    p.add_argument("--colocated-only", action="store_true",
                   help="no prefill/decode splits")
    p.add_argument("--disaggregate", action="store_true",
                   help="compare colocated engines with prefill/decode splits, each role in "
                   "each --role-precision, the handoff in the decode engine's KV format")
    p.add_argument("--role-precision", action="append", default=None, metavar="PRECISION",
                   help="a precision to try per role with --disaggregate (repeatable; default: "
                   "bfloat16, kv=float8, weights=int8,kv=int8, float8)")
    p.add_argument("--interconnect-gbps", type=float, default=None, metavar="GB/S",
                   help="with --disaggregate: the handoff link's bandwidth per device, GB/s "
                   "(default: the profile's intra-host link, inter-host across hosts)")
    p.add_argument("--host-step-ms", type=float, default=None,
                   help="override the profile's host time per step (ms)")
    p.add_argument("--host-seq-us", type=float, default=None,
                   help="override the profile's host time per sequence in a step (us)")
    p.add_argument("--speculative-acceptance", type=float, default=None, metavar="A",
                   help="plan speculative decoding: each proposal kept with probability A "
                   "(colocated layouts only)")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help="proposals verified per sequence and step (default 4)")
    p.add_argument("--speculative-model", default=None, metavar="CONFIG",
                   help="a draft model (config as --model) proposing on the same devices "
                   "(default: proposals cost nothing, as prompt lookup's)")
    p.add_argument("--top", type=int, default=15, help="rows of the table (default 15)")
    p.add_argument("--json", default=None, help="write every layout's numbers here")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("calibrate", help="measure this machine (matmul rates, bandwidth, host "
                       "time per step, collectives) and write its hardware profile")
    p.add_argument("--out", default="cpu-local.yaml", help="profile to write "
                   "(default cpu-local.yaml)")
    p.add_argument("--name", default="cpu-local", help="the profile's name")
    p.add_argument("--devices", type=int, default=2,
                   help="simulated CPU devices for the collective measurement (default 2; "
                   "an XLA_FLAGS device count already set wins)")
    p.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds)")
    p.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # user errors (a coordinator that does not answer too): one clear line, no traceback
    except (ValueError, TypeError, FileNotFoundError, ConnectionError) as e:
        print(f"jaxserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
