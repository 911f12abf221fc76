"""The committed generated code matches the protos; the API follows the buf conventions."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "moed" / "server" / "gen"


def test_regenerating_gives_no_diff(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    committed = sorted(p.name for p in GEN.iterdir() if p.is_file())
    assert fresh == committed
    for name in fresh:
        assert (tmp_path / name).read_text() == (GEN / name).read_text(), f"{name} is stale"


def test_services_and_messages_follow_buf_style():
    from moed.server.gen import admin_pb2, generation_pb2
    for mod in (generation_pb2, admin_pb2):
        fd = mod.DESCRIPTOR
        assert fd.package == "moed.v1"
        for svc in fd.services_by_name.values():
            assert svc.name.endswith("Service")
            for m in svc.methods:
                assert m.input_type.name == f"{m.name}Request"
                assert m.output_type.name == f"{m.name}Response"
        for enum in fd.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED")


def test_zero_meaningful_sampling_fields_have_presence():
    from moed.server.gen import generation_pb2 as pb
    s = pb.SamplingParams(temperature=0.0)
    assert s.HasField("temperature") and not s.HasField("top_p")
    assert pb.GenerateRequest(logprobs=0).HasField("logprobs")
