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
