"""MoE config: the published 21B-A3B config.json round trip, which layers are MoE, presets, bad values."""
import dataclasses
import json

import pytest

from libernie.config import (PRESETS, ErnieConfig, ernie_4_5_0_3b, ernie_4_5_21b_a3b, ernie_tiny, ernie_tiny_moe,
                             parameter_counts)
from libernie.errors import ConfigError

PUBLISHED_21B_A3B = {  # shaped like the published ERNIE-4.5-21B-A3B config.json, Paddle-only keys included
    "architectures": ["Ernie4_5_MoeForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
    "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 12288, "max_position_embeddings": 131072,
    "model_type": "ernie4_5_moe", "num_attention_heads": 20, "num_key_value_heads": 4, "num_hidden_layers": 28,
    "rms_norm_eps": 1e-05, "use_cache": False, "vocab_size": 103424, "rope_theta": 500000, "use_rmsnorm": True,
    "tie_word_embeddings": True, "use_bias": False, "moe_num_experts": 64, "moe_num_shared_experts": 2,
    "moe_layer_start_index": 1, "moe_intermediate_size": 1536, "moe_capacity": [64, 64, 64], "moe_gate": "topk",
    "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": True, "dtype": "bfloat16",
    "num_nextn_predict_layers": 1,
}


def test_published_moe_config_round_trips_unchanged(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_21B_A3B))
    cfg = ErnieConfig.from_file(tmp_path)
    assert cfg.is_moe and cfg.head_dim == 128 and cfg.expert_size == 1536 and cfg.moe_use_aux_free
    assert [cfg.is_moe_layer(i) for i in range(28)] == [False] + [True] * 27  # end index absent: last layer
    for layout in ("paddle", "hf"):
        cfg.save(tmp_path, layout=layout)
        assert json.loads((tmp_path / "config.json").read_text()) == PUBLISHED_21B_A3B
    shapes = ernie_4_5_21b_a3b()
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "moe_num_experts", "moe_k", "moe_intermediate_size", "moe_num_shared_experts",
              "moe_layer_start_index", "moe_layer_interval", "moe_use_aux_free", "vocab_size", "tie_word_embeddings"):
        assert getattr(shapes, f) == getattr(cfg, f), f
    assert [shapes.is_moe_layer(i) for i in range(28)] == [False] + [True] * 27


def test_transformers_style_config_keeps_its_keys(tmp_path):
    d = {**{k: v for k, v in PUBLISHED_21B_A3B.items() if k not in ("rope_theta",)},
         "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "moe_layer_end_index": 27,
         "moe_norm_min": 1e-12, "router_aux_loss_coef": 0.001, "output_router_logits": False}
    (tmp_path / "config.json").write_text(json.dumps(d))
    cfg = ErnieConfig.from_file(tmp_path)
    assert cfg.moe_layer_end_index == 27 and cfg.extra["router_aux_loss_coef"] == 0.001
    assert cfg.to_dict() == d


@pytest.mark.parametrize("start,end,interval,layers", [
    (0, -1, 1, [0, 1, 2, 3, 4, 5]), (1, None, 1, [1, 2, 3, 4, 5]), (0, 3, 2, [1, 3]), (2, 5, 3, [2, 5]),
    (0, 0, 1, [0]),
])
def test_which_layers_are_moe(start, end, interval, layers):
    cfg = ErnieConfig(num_hidden_layers=6, moe_num_experts=4, moe_k=2, moe_layer_start_index=start,
                      moe_layer_end_index=end, moe_layer_interval=interval)
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == layers


def test_dense_configs_gain_no_moe_keys():
    d = ernie_tiny().to_dict()
    assert not [k for k in d if k.startswith("moe_")] and d["model_type"] == "ernie4_5"
    m = ernie_tiny_moe().to_dict(layout="paddle")
    assert m["model_type"] == "ernie4_5_moe" and m["architectures"] == ["Ernie4_5_MoeForCausalLM"]
    assert dataclasses.replace(ErnieConfig.from_dict(m), extra={}) == ernie_tiny_moe()


def test_presets_are_registered():
    assert PRESETS["ernie-tiny-moe"](vocab_size=99).vocab_size == 99
    assert PRESETS["ernie-4.5-21b-a3b"]().moe_num_experts == 64


@pytest.mark.parametrize("bad,msg", [
    ({"moe_k": 7, "moe_num_experts": 6}, "exceeds"),
    ({"moe_num_experts": [64, 64]}, "multimodal"),
    ({"moe_layer_interval": 0}, "moe_layer_interval"),
    ({"moe_norm_min": 0}, "moe_norm_min"),
    ({"use_bias": True}, "tie_word_embeddings"),
    ({"model_type": "ernie4_5_vl_moe"}, "model_type"),
    ({"moe_num_experts": 0}, "needs moe_num_experts"),
])
def test_bad_moe_configs_name_the_file(tmp_path, bad, msg):
    (tmp_path / "config.json").write_text(json.dumps({**PUBLISHED_21B_A3B, **bad}))
    with pytest.raises(ConfigError, match=msg) as e:
        ErnieConfig.from_file(tmp_path)
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("cfg", [ernie_tiny_moe(vocab_size=48), ernie_tiny(vocab_size=48)], ids=["moe", "dense"])
@pytest.mark.parametrize("mtp", [0, 1])
def test_parameter_counts_equal_the_built_model(cfg, mtp):
    from libernie.model import ErnieForCausalLM
    cfg.extra["num_nextn_predict_layers"] = mtp
    cfg.use_bias, cfg.tie_word_embeddings = (True, False) if not cfg.is_moe else (False, True)
    params = dict(ErnieForCausalLM(cfg).named_parameters())
    n = sum(int(p.size) for p in params.values())
    n_mtp = sum(int(p.size) for name, p in params.items() if ".mtp_" in name)
    assert (n_mtp > 0) == bool(mtp)
    counts = parameter_counts(cfg)
    assert counts["total"] == n
    # 2 MoE layers, each using k of its E experts of 3*h*m parameters; MTP heads never run
    unused = 2 * (cfg.moe_num_experts - cfg.moe_k) * 3 * cfg.hidden_size * cfg.expert_size if cfg.is_moe else 0
    assert counts["active"] == n - unused - n_mtp


def test_published_sizes():
    """21B-A3B: about 21.8B parameters, about 3B active per token (3.3B counting the embedding); 0.3B: 0.36B."""
    c = parameter_counts(ernie_4_5_21b_a3b())
    assert 21.7e9 < c["total"] < 21.9e9 and 3.0e9 < c["active"] < 3.4e9
    assert 0.35e9 < parameter_counts(ernie_4_5_0_3b())["total"] < 0.37e9
