"""Several processes as one engine (jaxserve/runtime/distributed.py): real processes on loopback,
each with 4 simulated CPU devices (gloo collectives), started with subprocess on a free port and
killed, all of them, at a timeout. The oracle is the same job in this process on 8 devices."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from jaxserve import cli
from jaxserve.runtime.distributed import PEER_LOST_EXIT
from jaxserve.runtime.plan_channel import decode, encode
from jaxserve.settings import DistributedSettings, Settings
from tests.serving_helpers import REPO, ServerProcess, wait_until

# A small step, one step in flight: on 2 cores, collectives in flight past one starve XLA:CPU.
ENGINE = ["--max-num-seqs", "4", "--max-steps-in-flight", "1", "--max-num-batched-tokens", "64",
          "--compilation", "on_use"]
POOL = ["--kv-blocks", "16"]
ITEMS = [  # greedy and seeded sampling in one batch
    {"id": "greedy", "prompt": [5, 17, 99, 3, 250, 41], "max_tokens": 8, "temperature": 0},
    {"id": "seeded", "prompt": [7, 7, 300, 12], "max_tokens": 8, "temperature": 0.9,
     "top_p": 0.9, "seed": 11},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int = 4) -> dict[str, str]:
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    return {**os.environ, "XLA_FLAGS": " ".join(
        [*flags, f"--xla_force_host_platform_device_count={devices}"]),  # the suite's, 4 devices
        "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def distributed_flags(port: int, num: int, pid: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num),
            "--process-id", str(pid)]


@contextlib.contextmanager
def processes(argvs: list[list[str]], devices: int = 4):
    """`python -m jaxserve.cli ARGV` for each argv; every one still running is killed at the
    end, so no process outlives the test."""
    procs = [subprocess.Popen([sys.executable, "-m", "jaxserve.cli", *argv], cwd=REPO,
                              env=process_env(devices), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for argv in argvs]
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)


@contextlib.contextmanager
def served_pair(served: list[str]):
    """`jaxserve serve` as a leader and a follower, both killed at the end; yields (leader,
    follower, gRPC port). The leader is serving when this yields."""
    port, grpc_port = free_port(), free_port()
    pair = [ServerProcess("--port", str(grpc_port), *served, *distributed_flags(port, 2, pid),
                          env=process_env()) for pid in range(2)]
    try:
        pair[0].wait_for("stdout", "jaxserve serving on", timeout=300)
        yield pair[0], pair[1], grpc_port
    finally:
        for process in pair:
            process.kill()


def finish(procs, timeout: float) -> list[tuple[int, str]]:
    """Exit status and output of each process; all are killed if any is not done by then."""
    deadline = time.monotonic() + timeout
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"processes still running after {timeout} s")
        out.append((p.returncode, text))
    return out


@pytest.fixture(scope="module")
def model(hf_model_dir) -> Path:
    return hf_model_dir("llama")[1]


@pytest.fixture(scope="module")
def items_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multihost") / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def tokens_of(path: Path) -> dict[str, list[int]]:
    return {r["id"]: r["token_ids"] for r in map(json.loads, path.read_text().splitlines())}


def sampling_of(item: dict) -> dict:
    return {k: v for k, v in item.items() if k not in ("id", "prompt")}


def reference_tokens(model: Path, flags: list[str], items_file: Path, out: Path,
                     one_at_a_time: bool = False) -> dict[str, list[int]]:
    """The oracle: the same items on one process with 8 devices, the same flags."""
    from jaxserve import LLM, SamplingParams
    from jaxserve.offline.generate import run_batch

    args = cli.build_parser().parse_args(["generate", "--model", str(model), *flags])
    llm = LLM(model, settings=cli._settings(args))
    if one_at_a_time:  # as a client sends them, one request after the other
        return {item["id"]: llm.generate([item["prompt"]], SamplingParams(**sampling_of(item)),
                                         use_tqdm=False)[0].outputs[0].token_ids
                for item in ITEMS}
    run_batch(llm, items_file, out, {}, progress=False)
    return tokens_of(out)


# ---- the same tokens as one process (offline) ----

@pytest.mark.slow  # two processes load, compile and generate: ~75-120 s on 2 busy cores
def test_two_processes_of_4_devices_generate_the_tokens_of_one_process_of_8_dp_tp(
        model, items_file, tmp_path):
    flags = ["--mesh", "dp=2,tp=4", "--rules", "dp_tp", *ENGINE, *POOL]
    port = free_port()
    outs = [tmp_path / f"out{pid}.jsonl" for pid in range(2)]
    with processes([["generate", "--model", str(model), "--input", str(items_file),
                     "--output", str(outs[pid]), "--no-progress", *flags,
                     *distributed_flags(port, 2, pid)] for pid in range(2)]) as procs:
        done = finish(procs, timeout=400)
    assert [rc for rc, _ in done] == [0, 0], done
    assert not outs[1].exists()  # only the leader has results
    reference = reference_tokens(model, flags, items_file, tmp_path / "reference.jsonl")
    assert tokens_of(outs[0]) == reference
    assert all(len(t) == 8 for t in reference.values())


# ---- served: the same tokens, then a lost follower ----

@pytest.mark.slow  # two processes load and compile: ~50-70 s on 2 busy cores
def test_two_served_processes_give_the_tokens_of_one_then_fail_unavailable_without_a_follower(
        model, items_file, tmp_path):
    from jaxserve.serving.client import Client

    timeout = 4.0
    # no POOL: the KV pool is sized from each host's free memory, the smallest agreed on
    flags = ["--mesh", "tp=8", "--rules", "tp", *ENGINE]
    served = ["--model", str(model), *flags, "--peer-timeout", str(timeout),
              "--step-delay", "0.2"]
    with served_pair(served) as (leader, follower, grpc_port), \
            Client(f"127.0.0.1:{grpc_port}") as client:
        assert client.health() == "SERVING"
        tokens = {item["id"]: client.complete(item["prompt"], timeout=120,
                                              **sampling_of(item))[0].token_ids
                  for item in ITEMS}
        stream = client.generate([5, 17, 99], max_tokens=200, temperature=0, ignore_eos=True,
                                 timeout=120)
        next(stream)  # generating: steps run on both processes
        follower.proc.kill()
        killed = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            for _ in stream:
                pass
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert "process 1 sent no heartbeat" in failed.value.details()
        assert time.monotonic() - killed < timeout + 5
        assert client.health() == "NOT_SERVING"
        assert leader.proc.wait(30) == PEER_LOST_EXIT
    assert all(len(t) == 8 for t in tokens.values())
    assert tokens == reference_tokens(model, flags, items_file, tmp_path / "ref.jsonl",
                                      one_at_a_time=True)


def test_a_killed_leader_makes_the_follower_exit(model):
    served = ["--model", str(model), "--mesh", "tp=8", *ENGINE, *POOL, "--peer-timeout", "4"]
    with served_pair(served) as (leader, follower, _):
        assert follower.proc.poll() is None  # following
        leader.proc.kill()
        # jax's client aborts it as soon as the coordinator is gone; else the heartbeat's exit
        assert follower.proc.wait(4 + 10) != 0


# ---- bad input ----

@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve"],
                                     ["score", "--input", "i", "--output", "o"]])
def test_distributed_flags_reach_the_settings_tree(command):
    args = cli.build_parser().parse_args(
        [*command, *distributed_flags(1234, 3, 2), "--peer-timeout", "2.5",
         "--connect-timeout", "7"])
    assert cli._settings(args).distributed == DistributedSettings(
        "127.0.0.1:1234", 3, 2, peer_timeout=2.5, connect_timeout=7.0)
    settings = Settings().replace(distributed=DistributedSettings("h:1", 2, 1), max_num_seqs=3)
    assert settings.distributed.process_id == 1 and settings.scheduler.max_num_seqs == 3
    assert not Settings().distributed.enabled


@pytest.mark.parametrize("argv,says", [
    (distributed_flags(1234, 2, 2), "process_id must be an integer in [0, 1] (num_processes is "
                                    "2), got 2"),
    (distributed_flags(1234, 2, -1), "process_id must be an integer in [0, 1]"),
    (["--num-processes", "2"], "num_processes 2 needs a coordinator"),
    (["--coordinator", "nohost", "--num-processes", "2"], "coordinator must be HOST:PORT"),
    (distributed_flags(1234, 2, 0) + ["--peer-timeout", "0"], "peer_timeout must be a positive"),
])
def test_bad_distributed_settings_are_a_clear_error(argv, says, capsys, tmp_path):
    from jaxserve import LLM

    assert cli.main(["generate", "--prompt", "x", *argv]) == 2
    error = capsys.readouterr().err
    assert says in error
    with pytest.raises(ValueError) as raised:  # the same error from LLM
        args = cli.build_parser().parse_args(["generate", *argv])
        LLM(tmp_path / "no-such-model", **{leaf.name: getattr(args, leaf.name)
                                           for leaf in Settings.leaves()
                                           if leaf.section == "distributed"})
    assert error == f"jaxserve generate: error: {raised.value}\n"


def test_an_unreachable_coordinator_and_a_mesh_too_large_are_clear_errors(model):
    unreachable = ["generate", "--model", str(model), "--prompt", "x", "--connect-timeout", "2",
                   *distributed_flags(free_port(), 2, 1)]
    too_large = ["generate", "--model", str(model), "--prompt", "x", "--mesh", "tp=8",
                 *distributed_flags(free_port(), 1, 0)]
    started = time.monotonic()
    with processes([unreachable, too_large]) as procs:
        (rc1, out1), (rc2, out2) = finish(procs, timeout=120)
    assert rc1 == 2 and f"cannot reach the coordinator 127.0.0.1:" in out1, out1
    assert "within 2 s" in out1 and "--process-id 0" in out1
    assert rc2 == 2 and "mesh 'tp=8' needs 8 devices but only 4 cpu device(s) exist" in out2, out2
    assert time.monotonic() - started < 120


# ---- the plan's wire format ----

def test_a_step_plan_survives_the_wire_bit_for_bit(model):
    import jax
    import numpy as np

    from jaxserve import LLM, SamplingParams

    engine = LLM(model, max_num_seqs=2, kv_blocks=8, max_num_batched_tokens=32).engine
    engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=2, temperature=0.5, seed=3))
    plan = engine.scheduler.schedule(can_preempt=True)
    inputs = engine.builder.build(plan, engine.compiler.shape_for).inputs
    kind, (back,) = decode(encode("step", (inputs,)))
    assert kind == "step" and type(back) is type(inputs)
    sent, got = jax.tree.leaves_with_path(inputs), jax.tree.leaves_with_path(back)
    assert [path for path, _ in sent] == [path for path, _ in got]
    for (_, a), (_, b) in zip(sent, got):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert back.metadata.decode_rows == inputs.metadata.decode_rows
    with pytest.raises(ValueError, match="unknown command 'run'"):
        encode("run", ())
    with pytest.raises(TypeError, match="cannot carry a builtin_function_or_method"):
        encode("step", (len,))
