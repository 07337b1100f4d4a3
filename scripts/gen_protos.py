"""Generate Python code for protos/lpreg/v1/*.proto into lpreg_core/wire/.

Usage:
    python scripts/gen_protos.py            # regenerate in place
    python scripts/gen_protos.py --check    # exit 1 if the checked-in code is stale
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT = ROOT / "lpreg_core" / "wire"
PACKAGE = "lpreg_core.wire"


def generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # protoc emits absolute imports rooted at the proto include path (lpreg.v1); make them
    # package-relative so the generated code lives inside lpreg_core.
    for path in out.rglob("*.py*"):
        text = path.read_text()
        fixed = re.sub(
            r"^from lpreg\.v1 import", f"from {PACKAGE}.lpreg.v1 import", text, flags=re.M
        )
        path.write_text(fixed)
    for pkg in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (pkg / "__init__.py").touch()


def generated_files(root: Path) -> list[Path]:
    return sorted(
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if lpreg_core/wire is stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = generated_files(fresh), generated_files(OUT)
        stale = [
            str(p)
            for p in want
            if p not in have or not filecmp.cmp(fresh / p, OUT / p, shallow=False)
        ]
        stale += [str(p) for p in have if p not in want]
        if stale:
            print(
                "generated protobuf code is stale; run `python scripts/gen_protos.py`:",
                *stale,
                sep="\n  ",
            )
            return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
