"""Regenerate the Python stubs from the `.proto` files in this folder.

    python -m node_agent.proto.generate            # rewrite the committed stubs
    python -m node_agent.proto.generate --out DIR  # write them under DIR instead

Stubs are generated with the repository root as the import root, so they import each other as
`node_agent.proto.*`. The committed stubs must be byte-identical to what this produces with the
pinned grpcio-tools (a test checks it): edit a `.proto`, run this, commit both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent.parent
PROTO_FILES: tuple[str, ...] = ("node_agent.proto", "controller.proto")


class ProtocError(RuntimeError):
    """protoc rejected a `.proto` file (its message names the file and line)."""


def generate(out_root: Path) -> list[Path]:
    """Write `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` under `out_root/node_agent/proto/`.

    Returns the written files, sorted. Raises `ProtocError` if protoc fails.
    """
    from grpc_tools import protoc

    out_dir = out_root / "node_agent" / "proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    rel = [str(Path("node_agent") / "proto" / name) for name in PROTO_FILES]
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *rel,
    ]
    if protoc.main(args) != 0:
        raise ProtocError(f"protoc failed on {', '.join(rel)}; see the messages above.")
    return sorted(
        p for p in out_dir.iterdir() if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (repo root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
