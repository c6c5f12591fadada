"""The `jaxserve` command: parse, validate, hand to the API. No engine logic lives here."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, help="device mesh, e.g. 'tp=4' or 'dp=2,tp=2' "
                   "(default: one device)")
    p.add_argument("--rules", default="tp", help="sharding rules: a name in sharding_rules/ or a "
                   "YAML path (default: tp)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="parameter dtype (default: the checkpoint's)")


def cmd_convert(args) -> int:
    from jaxserve.checkpoint import convert_hf

    config = convert_hf(args.hf, args.out, dtype=args.dtype)
    print(f"converted {args.hf} -> {args.out}: {config.family}, {config.num_layers} layers, "
          f"{config.num_params() / 1e6:.1f}M parameters, {config.dtype}")
    return 0


def cmd_shard_info(args) -> int:
    import jax.numpy as jnp

    from jaxserve.checkpoint import CONFIG_FILE, param_specs, parse_dtype
    from jaxserve.config import ModelConfig
    from jaxserve.sharding import Layout

    config = ModelConfig.load(Path(args.model) / CONFIG_FILE)
    dtype = parse_dtype(args.dtype, default=config.dtype)
    layout = Layout.create(args.mesh, args.rules, abstract=True)  # planning needs no devices
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
    for row in [header] + rows:
        print("  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))))
    print(f"total per device: {total:,} bytes ({total / 2**20:.2f} MiB)")
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

    p = sub.add_parser("shard-info", help="show how each parameter is partitioned")
    p.add_argument("--model", required=True, help="jaxserve checkpoint directory")
    _add_mesh_args(p)
    p.set_defaults(func=cmd_shard_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # user errors: one clear line, no traceback
        print(f"jaxserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
