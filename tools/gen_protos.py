"""Generate the Python gRPC code for protos/moed/v1 into moed/server/gen.

    python tools/gen_protos.py [--out DIR]

protoc writes `from moed.v1 import x_pb2`, a module path that does not exist
in the package; the generated files are flattened into one directory and that
import rewritten to `from moed.server.gen import x_pb2`. The output is
committed; tests/test_protos.py regenerates into a temp dir and asserts no diff.
"""
import argparse
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
DEFAULT_OUT = ROOT / "moed" / "server" / "gen"
PACKAGE = "moed.server.gen"
HEADER = '"""Generated from protos/moed/v1 by tools/gen_protos.py. Do not edit."""\n'


def proto_files():
    return sorted(p.relative_to(PROTO_ROOT).as_posix() for p in (PROTO_ROOT / "moed" / "v1").glob("*.proto"))


def run_protoc(dest):
    from grpc_tools import protoc
    import grpc_tools
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={dest}",
            f"--pyi_out={dest}", f"--grpc_python_out={dest}", *proto_files()]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {', '.join(proto_files())}")


def rewrite(text):
    return re.sub(r"^from moed\.v1 import ", f"from {PACKAGE} import ", text, flags=re.M)


def generate(out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(tmp)
        for src in sorted((Path(tmp) / "moed" / "v1").iterdir()):
            (out / src.name).write_text(rewrite(src.read_text()))
    (out / "__init__.py").write_text(HEADER)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    names = generate(ap.parse_args(argv).out)
    print("\n".join(names))


if __name__ == "__main__":
    sys.exit(main())
