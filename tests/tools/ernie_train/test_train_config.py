import pytest

from ernie_train.config import TrainConfigError, load_yaml, resolve
from ernie_train.optim import lr_at, no_decay

BASE = {"data": "d", "output_dir": "o", "init_config": "ernie-tiny"}


def test_flags_override_file_and_yaml_numbers_are_coerced(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("learning_rate: 3e-4\nmax_steps: 10\nper_device_train_batch_size: 4\nlora_target_modules: o_proj\n")
    cfg = resolve("pretrain", {**BASE, **load_yaml(str(p))}, {"max_steps": 20})
    assert cfg.learning_rate == 3e-4 and isinstance(cfg.learning_rate, float)  # PyYAML reads 3e-4 as a string
    assert cfg.max_steps == 20 and cfg.per_device_train_batch_size == 4


@pytest.mark.parametrize("text,msg", [
    ("learning_rat: 1\n", "unknown option 'learning_rat'"),
    ("max_steps: ten\n", "max_steps: expected int"),
    ("lora: yes please\n", "lora: expected true or false"),
    ("max_steps: [1\n", "invalid YAML"),
])
def test_bad_yaml_is_one_line_naming_the_file(tmp_path, text, msg):
    p = tmp_path / "t.yaml"
    p.write_text(text)
    with pytest.raises(TrainConfigError, match=msg) as e:
        resolve("pretrain", {**BASE, **load_yaml(str(p))}, {})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("over,msg", [
    ({"init_config": None}, "exactly one of --model"),
    ({"lora": True}, "--lora needs --model"),
    ({"lr_scheduler_type": "step"}, "cosine, linear or constant"),
    ({"max_steps": 0}, "--max-steps must be > 0"),
])
def test_invalid_combinations(over, msg):
    with pytest.raises(TrainConfigError, match=msg):
        resolve("pretrain", {**BASE, **over}, {})


def test_lr_schedule_by_hand():
    kw = dict(lr=1.0, min_lr=0.1, warmup=2, total=12)
    assert [lr_at(s, kind="cosine", **kw) for s in (0, 1)] == [0.5, 1.0]
    assert lr_at(2, kind="cosine", **kw) == 1.0 and lr_at(7, kind="cosine", **kw) == pytest.approx(0.55)
    assert lr_at(12, kind="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(7, kind="linear", **kw) == pytest.approx(0.55) and lr_at(9, kind="linear", **kw) == pytest.approx(0.37)
    assert lr_at(9, kind="constant", **kw) == 1.0


def test_no_weight_decay_on_norms_biases_embeddings():
    assert no_decay("ernie.layers.0.input_layernorm.weight") and no_decay("ernie.embed_tokens.weight")
    assert no_decay("ernie.layers.0.self_attn.qkv_proj.bias") and not no_decay("ernie.layers.0.mlp.down_proj.weight")
