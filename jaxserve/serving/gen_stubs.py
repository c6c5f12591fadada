"""Regenerate the checked-in Python stubs of jaxserve.proto: `python -m jaxserve.serving.gen_stubs`.

Equivalent to

    python -m grpc_tools.protoc -I jaxserve/serving --python_out=jaxserve/serving \
        --pyi_out=jaxserve/serving --grpc_python_out=jaxserve/serving \
        jaxserve/serving/jaxserve.proto

followed by one fix: protoc writes `import jaxserve_pb2` (a top-level module) into
jaxserve_pb2_grpc.py; here it becomes a package-relative import. An optional argument writes the
files to another directory (the tests regenerate into a temporary one and compare).

The output depends on the grpcio-tools version (it embeds the protobuf version it was built for),
which is why the `test` extra pins grpcio-tools. Never edit the generated files by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = "jaxserve.proto"
GENERATED = ("jaxserve_pb2.py", "jaxserve_pb2.pyi", "jaxserve_pb2_grpc.py")
_TOP_LEVEL_IMPORT = "import jaxserve_pb2 as jaxserve__pb2"
_RELATIVE_IMPORT = "from . import jaxserve_pb2 as jaxserve__pb2"


def generate(out_dir: str | Path = HERE) -> list[Path]:
    """Run protoc on jaxserve.proto into out_dir; returns the files written."""
    import importlib.resources

    from grpc_tools import protoc

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    rc = protoc.main(["grpc_tools.protoc", f"-I{HERE}", f"-I{well_known}",
                      f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
                      str(HERE / PROTO)])
    if rc != 0:
        raise RuntimeError(f"protoc failed on {HERE / PROTO} (exit status {rc})")
    grpc_file = out / "jaxserve_pb2_grpc.py"
    source = grpc_file.read_text()
    if _TOP_LEVEL_IMPORT not in source:
        raise RuntimeError(f"{grpc_file}: protoc no longer writes {_TOP_LEVEL_IMPORT!r}; "
                           "update gen_stubs.py")
    grpc_file.write_text(source.replace(_TOP_LEVEL_IMPORT, _RELATIVE_IMPORT))
    return [out / name for name in GENERATED]


if __name__ == "__main__":
    for path in generate(sys.argv[1] if len(sys.argv) > 1 else HERE):
        print(path)
