import dataclasses
import json

import pytest

from libernie.config import ErnieConfig, ernie_4_5_0_3b
from libernie.errors import ConfigError

PUBLISHED_PADDLE = {  # shape of the published ERNIE-4.5-0.3B-Paddle config.json (Paddle-only keys included)
    "architectures": ["Ernie4_5_ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 131072,
    "model_type": "ernie4_5", "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 128,
    "num_hidden_layers": 18, "rms_norm_eps": 1e-05, "rope_theta": 500000, "tie_word_embeddings": True,
    "use_bias": False, "vocab_size": 103424, "compression_ratio": 1.0, "use_rmsnorm": True,
    "fuse_rms_norm": False, "use_flash_attention": True, "dtype": "bfloat16",
}


def test_unknown_keys_survive_a_round_trip(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_PADDLE))
    cfg = ErnieConfig.from_file(tmp_path)
    assert cfg.q_size == 2048 and cfg.extra["use_rmsnorm"] is True
    assert dataclasses.replace(cfg, extra={}) == ernie_4_5_0_3b()
    cfg.save(tmp_path, layout="paddle")
    assert json.loads((tmp_path / "config.json").read_text()) == PUBLISHED_PADDLE


def test_transformers5_rope_parameters_are_read_and_kept(tmp_path):
    d = {k: v for k, v in PUBLISHED_PADDLE.items() if k != "rope_theta"}
    d["rope_parameters"] = {"rope_theta": 10000.0, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ErnieConfig.from_file(tmp_path)
    assert cfg.rope_theta == 10000.0
    out = cfg.to_dict(layout="hf")
    assert "rope_theta" not in out and out["rope_parameters"] == d["rope_parameters"]
    assert out["architectures"] == ["Ernie4_5ForCausalLM"]


@pytest.mark.parametrize("bad,msg", [
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"hidden_size": 0}, "positive integer"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4}}, "rope_type"),
])
def test_bad_configs_name_the_file(tmp_path, bad, msg):
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED_PADDLE, **bad}))
    with pytest.raises(ConfigError, match=msg) as e:
        ErnieConfig.from_file(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_and_broken_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ErnieConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ErnieConfig.from_file(tmp_path)


def test_both_rope_spellings_are_written_back_when_both_were_there(tmp_path):
    d = {**PUBLISHED_PADDLE, "rope_parameters": {"rope_theta": 500000, "rope_type": "default"}}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ErnieConfig.from_file(tmp_path)
    cfg.rope_theta = 10000.0
    out = cfg.to_dict()
    assert out["rope_theta"] == 10000.0 and out["rope_parameters"]["rope_theta"] == 10000.0
