"""Tiny bases and adapters for the ernie-merge tests, built with libernie (the model and LoRA layers are the truth)."""
import json
import os

import numpy as np
import paddle

from libernie.config import ernie_tiny
from libernie.lora import LoRAConfig, apply_lora, lora_parameters, save_adapter
from libernie.model import ErnieForCausalLM

IDS = [[5, 9, 1, 33, 2, 60, 7, 7, 12, 40], [3, 14, 15, 9, 26, 53, 58, 9, 7, 9]]
SIDE_FILES = {"tokenizer.model": b"\x00sentencepiece-bytes\xff", "generation_config.json": b'{"do_sample": false}\n',
              "tokenizer_config.json": b'{"chat_template": "{{ messages }}", "add_bos_token": false}\n',
              "special_tokens_map.json": b'{"eos_token": "</s>"}\n'}


def make_base(path, tied=True, layout="hf", dtype=None, shard="20KB", seed=0) -> ErnieForCausalLM:
    """Save a random ernie_tiny (vocab 64) with side files; return the model (fp32, as loaded back from disk)."""
    paddle.seed(seed)
    cfg = ernie_tiny(vocab_size=64)
    cfg.tie_word_embeddings = tied
    model = ErnieForCausalLM(cfg)
    with paddle.no_grad():  # norms init to 1: perturb them so a mix-up of tensors cannot pass
        for name, p in model.named_parameters():
            if "norm" in name:
                p.set_value(1.0 + 0.2 * paddle.randn(p.shape))
    model.save_pretrained(path, layout=layout, max_shard_size=shard, dtype=dtype)
    for fname, data in SIDE_FILES.items():
        with open(os.path.join(path, fname), "wb") as f:
            f.write(data)
    return ErnieForCausalLM.from_pretrained(path)


def make_adapter(model, path, base_dir, targets=("qkv_proj", "o_proj", "up_gate_proj", "down_proj"), r=4,
                 alpha=None, rslora=False, seed=1) -> LoRAConfig:
    """apply_lora + random A and B (B is zero at init) + save_adapter; `model` becomes the adapted model."""
    cfg = LoRAConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=tuple(targets))
    apply_lora(model, cfg)
    paddle.seed(seed)
    for p in lora_parameters(model).values():
        p.set_value(paddle.randn(p.shape) * 0.1)
    model.eval()
    save_adapter(model, cfg, path, base_model=base_dir)
    return cfg


def logits(model_or_path, ids=IDS) -> np.ndarray:
    model = ErnieForCausalLM.from_pretrained(model_or_path) if isinstance(model_or_path, (str, os.PathLike)) \
        else model_or_path
    with paddle.no_grad():
        return model(paddle.to_tensor(ids)).logits.numpy()


def write_safetensors_np(path, tensors: dict, metadata=None):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
