"""`moectl pack MODEL_DIR` builds the packed expert store ahead of time; loading then reuses it."""
import json

from moed.cli import moectl


def test_pack_then_reuse(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))
    d = tiny_model_dir("deepseek_v3", "fp8")
    assert moectl.main(["--json", "pack", str(d)]) == 0
    first = json.loads(capsys.readouterr().out)
    store = tmp_path / "cache"
    assert first["store"].startswith(str(store))
    built = {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()}
    assert built
    assert moectl.main(["--json", "pack", str(d)]) == 0          # valid store: not rebuilt
    assert json.loads(capsys.readouterr().out)["store"] == first["store"]
    assert {p: p.stat().st_mtime_ns for p in store.rglob("*") if p.is_file()} == built


def test_pack_bad_dir_names_it(tmp_path, capsys):
    assert moectl.main(["pack", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err


def test_pack_verify_passes_on_a_good_store_and_fails_on_a_flipped_byte(tiny_model_dir, tmp_path,
                                                                         monkeypatch, capsys):
    from moed.backends.cpu.store import ExpertStore
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))
    d = tiny_model_dir("qwen3_moe", "bf16")
    assert moectl.main(["pack", "--verify", str(d)]) == 1            # nothing built yet
    assert "no expert store" in capsys.readouterr().err
    assert moectl.main(["--json", "pack", str(d)]) == 0
    path = json.loads(capsys.readouterr().out)["store"]
    assert moectl.main(["--json", "pack", "--verify", str(d)]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] == [path]
    at = ExpertStore.open(path).header["sections"][-1]["offset"] + 123
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 1]))
    assert moectl.main(["pack", str(d)]) == 0                        # the cheap checks pass
    capsys.readouterr()
    assert moectl.main(["pack", "--verify", str(d)]) == 1
    err = capsys.readouterr().err
    assert "fails its checksum" in err and path in err
    assert f"delete {path} and run `moectl pack {d}`" in err
