"""Generate (or check the freshness of) the committed protobuf/gRPC code from ``proto/``.

    python -m edgewise.runtime.proto.codegen           # regenerate
    python -m edgewise.runtime.proto.codegen --check   # exit 1 if the committed code is stale

Needs the ``dev`` extra (grpcio-tools, mypy-protobuf). protoc writes imports as if each proto
folder were a top-level package (``from inference import ...``); they are rewritten to relative
imports so the code lives inside ``edgewise.runtime.proto.generated``.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Final

PROJECT_ROOT: Final = Path(__file__).resolve().parents[2]
PROTO_ROOT: Final = PROJECT_ROOT / "proto"
GENERATED_ROOT: Final = Path(__file__).resolve().parent / "generated"

# proto folder (relative to proto/) -> generated package folder (relative to generated/)
PACKAGES: Final = {"inference": "inference", "edgewise/v1": "edgewise_v1"}


def _rewrite_imports(text: str, proto_package: str) -> str:
    dotted = proto_package.replace("/", ".")
    # "from inference import x_pb2 as ..." and "import inference.x_pb2" (in stubs)
    text = re.sub(rf"^from {re.escape(dotted)} import ", "from . import ", text, flags=re.M)
    text = re.sub(rf"^import {re.escape(dotted)}\.(\w+)$", r"from . import \1", text, flags=re.M)
    return re.sub(rf"\b{re.escape(dotted)}\.(\w+_pb2)\b", r"\1", text)


def generate(out_root: Path) -> None:
    """Run protoc for every proto folder and write the rewritten files under ``out_root``."""
    from grpc_tools import protoc  # imported here: only the dev extra has it

    include = Path(protoc.__file__).resolve().parent / "_proto"
    plugin_dir = Path(sysconfig.get_path("scripts"))
    with tempfile.TemporaryDirectory() as raw:
        raw_out = Path(raw)
        for proto_dir, package_dir in PACKAGES.items():
            sources = sorted(str(p) for p in (PROTO_ROOT / proto_dir).glob("*.proto"))
            args = [
                "protoc",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={raw_out}",
                f"--grpc_python_out={raw_out}",
                f"--plugin=protoc-gen-mypy={plugin_dir / 'protoc-gen-mypy'}",
                f"--plugin=protoc-gen-mypy_grpc={plugin_dir / 'protoc-gen-mypy_grpc'}",
                f"--mypy_out={raw_out}",
                f"--mypy_grpc_out={raw_out}",
                *sources,
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed for {proto_dir}")
            target = out_root / package_dir
            target.mkdir(parents=True, exist_ok=True)
            (target / "__init__.py").write_text('"""Generated code; do not edit."""\n')
            for produced in sorted((raw_out / proto_dir).iterdir()):
                if produced.suffix not in (".py", ".pyi"):
                    continue
                text = _rewrite_imports(produced.read_text(), proto_dir)
                (target / produced.name).write_text(text)


def _stale_files(expected: Path, actual: Path) -> list[str]:
    stale = []
    for path in sorted(expected.rglob("*")):
        if path.is_dir():
            continue
        relative = path.relative_to(expected)
        committed = actual / relative
        if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
            stale.append(str(relative))
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            fresh = Path(scratch)
            generate(fresh)
            stale = _stale_files(fresh, GENERATED_ROOT)
        if stale:
            print(f"generated code is stale, run `make proto`: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("generated code is fresh")
        return 0
    for package_dir in PACKAGES.values():
        shutil.rmtree(GENERATED_ROOT / package_dir, ignore_errors=True)
    generate(GENERATED_ROOT)
    print(f"generated code written to {GENERATED_ROOT.relative_to(PROJECT_ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
