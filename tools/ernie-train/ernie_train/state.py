"""Training checkpoints: OUTDIR/checkpoint-NNNNNNNN/, written atomically, the last K kept.

A checkpoint directory is a loadable model (config.json, sharded safetensors, tokenizer files) or,
with --lora, a loadable adapter (adapter_config.json, adapter_model.safetensors, tokenizer files),
plus optimizer.safetensors and trainer_state.json. See docs/formats/train-checkpoint.md.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from libernie.checkpoint import atomic_dir
from libernie.errors import CheckpointError
from libernie.lora import write_adapter
from libernie.tokenizer import ErnieTokenizer, resolve_tokenizer_file

from ernie_train import optim

PATTERN = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE, OPTIM_FILE = "trainer_state.json", "optimizer.safetensors"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


def name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def save(out_dir: str, step: int, model, opt, params: dict, state: dict, cfg, tokenizer_dir: str | None,
         lora_cfg=None) -> str:
    """Write checkpoint `step` under out_dir atomically; prune to cfg.save_total_limit. Returns its path."""
    path = os.path.join(out_dir, name(step))
    with atomic_dir(path) as tmp:
        if lora_cfg is not None:
            write_adapter(model, lora_cfg, tmp, base_model=cfg.model)
        else:
            model.save_pretrained(tmp, layout=cfg.save_layout)
        if tokenizer_dir:
            copy_tokenizer(tokenizer_dir, tmp)
        optim.save_state(opt, params, os.path.join(tmp, OPTIM_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w") as f:
            json.dump(state, f, indent=2)
    prune(out_dir, cfg.save_total_limit)
    return path


def copy_tokenizer(tokenizer: str, out_dir: str) -> None:
    """Tokenizer files into a checkpoint. `tokenizer` is a directory or a .model file of any name
    (libernie's resolve_tokenizer_file); the model is always written as tokenizer.model, the side files
    (tokenizer_config.json, chat template...) come from its directory, and a bare .model file gets the
    tokenizer_config.json and special_tokens_map.json that ErnieTokenizer writes, so transformers loads it."""
    model = resolve_tokenizer_file(tokenizer)
    src_dir = model.parent
    if not (src_dir / "tokenizer_config.json").is_file():
        ErnieTokenizer.from_pretrained(model).save_pretrained(out_dir)
    shutil.copy2(model, os.path.join(out_dir, "tokenizer.model"))
    for f in TOKENIZER_FILES[1:]:
        if (src_dir / f).is_file():
            shutil.copy2(src_dir / f, os.path.join(out_dir, f))


def complete(out_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first. Incomplete ones never carry the name."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for d in os.listdir(out_dir):
        m = PATTERN.match(d)
        if m and os.path.isfile(os.path.join(out_dir, d, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(out_dir, d)))
    return sorted(found)


def latest(out_dir: str) -> str | None:
    done = complete(out_dir)
    return done[-1][1] if done else None


def prune(out_dir: str, keep: int) -> None:
    for _, path in complete(out_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: str) -> dict:
    p = os.path.join(path, STATE_FILE)
    try:
        return json.load(open(p))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: unreadable ({e}); delete this checkpoint directory to resume from an "
                              "earlier one") from None
