"""Daemon config: defaults documented in etc/moed.yaml, precedence, errors naming the setting."""
from dataclasses import fields
from pathlib import Path

import pytest

from moed.config import Config, load_config, qualified
from moed.errors import ConfigError

ETC = Path(__file__).resolve().parents[1] / "etc" / "moed.yaml"


def test_etc_file_documents_every_setting_with_its_default():
    import yaml
    doc = yaml.safe_load(ETC.read_text())
    listed = {key: value for body in doc.values() for key, value in body.items()}
    assert set(listed) == {f.name for f in fields(Config)}
    assert load_config(ETC, env={}) == Config()


def test_precedence_file_env_flags(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("server:\n  port: 6000\n  admin_token: from-file\nengine:\n  max_num_seqs: 4\n"
                    "  max_num_batched_tokens: 32\n")
    cfg = load_config(path, env={})
    assert (cfg.port, cfg.admin_token, cfg.max_num_seqs) == (6000, "from-file", 4)
    cfg = load_config(path, env={"MOED_ADMIN_TOKEN": "from-env"})
    assert cfg.admin_token == "from-env"
    cfg = load_config(path, overrides={"port": 7000, "host": None}, env={})
    assert (cfg.port, cfg.host) == (7000, "127.0.0.1")


@pytest.mark.parametrize("yaml_text, setting", [
    ("server:\n  port: 70000\n", "server.port"),
    ("server:\n  port: fifty\n", "server.port"),
    ("server:\n  prot: 1\n", "server.prot"),
    ("serve:\n  port: 1\n", "serve"),
    ("engine:\n  max_num_seqs: 0\n", "engine.max_num_seqs"),
    ("engine:\n  max_num_seqs: 512\n", "engine.max_num_batched_tokens"),
    ("engine:\n  experts: gpu\n", "engine.experts"),
    ("server:\n  tls_cert_file: /x.pem\n", "server.tls_cert_file"),
    ("server:\n  log_level: loud\n", "server.log_level"),
    ("limits:\n  max_stop_strings: -1\n", "limits.max_stop_strings"),
    ("engine:\n  block_size: true\n", "engine.block_size"),
    ("engine:\n  verify_store: 1\n", "engine.verify_store"),
    ("engine:\n  accel: on\n", "engine.accel"),
    ("engine:\n  dslp_ranks: two\n", "engine.dslp_ranks"),
])
def test_bad_setting_is_named(tmp_path, yaml_text, setting):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path, env={})
    assert e.value.field == setting and setting in str(e.value)


def test_bare_on_and_off_mean_the_words(tmp_path):
    """YAML 1.1 reads a bare on / off as a boolean; the on/off settings take it so."""
    path = tmp_path / "m.yaml"
    path.write_text("engine:\n  prefill_worker: off\n  dual_batch: on\n  accel: off\n")
    cfg = load_config(path, env={})
    assert (cfg.prefill_worker, cfg.dual_batch, cfg.accel) == ("off", "on", "off")


def test_unreadable_and_invalid_yaml_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", env={})
    bad = tmp_path / "broken.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad, env={})


def test_engine_kwargs_and_qualified_names():
    cfg = Config(max_num_seqs=2, max_num_batched_tokens=8, num_kv_blocks=10)
    kw = cfg.engine_kwargs()
    assert kw["max_num_seqs"] == 2 and kw["num_kv_blocks"] == 10 and kw["device"] == "auto"
    assert kw.get("verify_store", False) is False
    assert Config(verify_store=True).engine_kwargs()["verify_store"] is True
    assert qualified("max_waiting") == "engine.max_waiting"
    assert Config(drain_timeout_s=3).drain_timeout_s == 3.0
