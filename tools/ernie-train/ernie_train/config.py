"""TrainConfig: every option of ernie-train, one field each, with its default and why.

Names follow ERNIEKit's training arguments (snake_case here and in YAML, kebab-case on the command
line), so its users feel at home. `--config FILE.yaml` is read first; explicit flags override it;
an unknown key is an error. The resolved config is written into OUTDIR and every checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from libernie.errors import ErnieError


class TrainConfigError(ErnieError):
    """An option or config file that does not describe a runnable training job."""


@dataclass
class TrainConfig:
    mode: str = "pretrain"                 # pretrain | sft | dpo (the subcommand)
    data: str = ""                         # ernie-pack prefix (PREFIX.json)
    eval_data: str | None = None           # held-out ernie-pack prefix
    model: str | None = None               # start from this checkpoint directory...
    init_config: str | None = None         # ...or from scratch: a preset name or a config.json path
    tokenizer: str | None = None           # with --init-config: copied into checkpoints; default: the model's
    output_dir: str = ""
    max_steps: int = 1000
    save_steps: int = 500                  # 0: only at the end
    save_total_limit: int = 3              # keep the last K checkpoints
    eval_steps: int = 0                    # 0: no periodic eval (still evaluated at the end if eval_data)
    eval_iters: int = 20                   # eval batches per evaluation
    logging_steps: int = 10
    learning_rate: float = 3e-4
    min_lr: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "cosine"      # cosine | linear | constant (after warmup)
    weight_decay: float = 0.01             # not applied to norms, biases and embeddings
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0             # 0: no clipping
    skip_nan_inf_steps: int = 0            # non-finite loss/grad steps to skip (no update) before stopping
    per_device_train_batch_size: int = 1
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_seq_len: int | None = None         # default: the shards' seq_len; may be smaller, never larger
    seed: int = 42
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None        # default 2 * rank, as ERNIEKit
    rslora: bool = False
    lora_dropout: float = 0.0
    lora_target_modules: str = "qkv_proj,o_proj,up_gate_proj,down_proj"
    lora_plus_scale: float = 1.0           # LoRA+: B matrices learn this many times faster
    recompute: bool = False                # activation recompute per decoder layer
    moe_aux_loss_lambda: float | None = None  # MoE: load-balancing loss weight; None: the model config's (1e-5)
    moe_z_loss_lambda: float | None = None    # MoE: router z-loss weight; None: the model config's (0: off)
    moe_aux_free_coef: float = 1e-3        # MoE with moe_use_aux_free: bias step per optimizer step (0: off)
    save_layout: str = "hf"                # hf (transformers, vLLM) | paddle (FastDeploy)
    visualdl_logdir: str | None = None
    peak_tflops: float | None = None       # for the MFU estimate; None: not reported
    resume: bool = False
    verify_data: bool = True               # sha256 of every shard against the manifest before training
    # ---- dpo only (ERNIEKit's DPOConfig names and defaults; formulas in tools/ernie-train/README.md) ----
    loss_type: str = "sigmoid"             # sigmoid | ipo | hinge | simpo | orpo | dpop
    beta: float = 0.1                      # inverse temperature of the implicit reward (orpo: lambda)
    label_smoothing: float = 0.0           # cDPO: probability a preference label is flipped (sigmoid, simpo)
    simpo_gamma: float = 0.5               # SimPO target margin
    dpop_lambda: float = 50.0              # DPO-Positive penalty weight
    sft_loss_ratio: float = 0.0            # + ratio x per-token NLL of the chosen response
    pref_loss_ratio: float = 1.0           # x the preference loss
    normalize_logps: bool = True           # rescale each response's log-prob sum to the pair's mean length
    offset_alpha: float = 0.0              # ERNIEKit's score offset; needs score deltas the shards do not keep
    reference_free: bool = False           # no reference (only with the reference-free simpo, orpo)
    ref_logps: str | None = None           # cached reference log-probs from `ernie-train dpo-ref`
    ref_model: str | None = None           # a frozen reference model directory (default: the starting model)
    eval_ref_logps: str | None = None      # cached reference log-probs of --eval-data (default: beside it)

    def validate(self) -> None:
        if self.mode not in ("pretrain", "sft", "dpo"):
            raise TrainConfigError(f"mode must be pretrain, sft or dpo, got {self.mode!r}")
        if not self.data:
            raise TrainConfigError("--data PREFIX is required (an ernie-pack output)")
        if not self.output_dir:
            raise TrainConfigError("-o/--output-dir is required")
        if (self.model is None) == (self.init_config is None):
            raise TrainConfigError("pass exactly one of --model DIR or --init-config PRESET|config.json")
        if self.lora and self.model is None:
            raise TrainConfigError("--lora needs --model: LoRA adapts an existing model")
        positive = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                    "gradient_accumulation_steps", "logging_steps", "lora_rank", "save_total_limit", "eval_iters")
        for name in positive:
            if getattr(self, name) <= 0:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in FIELDS:  # `--learning-rate nan` parses as a float; it would only fail hours later
            v = getattr(self, name)
            if isinstance(v, float) and not math.isfinite(v):
                raise TrainConfigError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
        for name in ("skip_nan_inf_steps", "learning_rate", "save_steps", "eval_steps", "warmup_steps",
                     "weight_decay", "min_lr", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("moe_aux_loss_lambda", "moe_z_loss_lambda", "moe_aux_free_coef"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise TrainConfigError(f"--lr-scheduler-type must be cosine, linear or constant, "
                                   f"got {self.lr_scheduler_type!r}")
        if self.save_layout not in ("hf", "paddle"):
            raise TrainConfigError(f"--save-layout must be hf or paddle, got {self.save_layout!r}")
        if self.min_lr > self.learning_rate:
            raise TrainConfigError(f"--min-lr {self.min_lr} is above --learning-rate {self.learning_rate}")
        if self.mode == "dpo":
            self._validate_dpo()
        else:
            for name in DPO_FIELDS:
                if getattr(self, name) != FIELDS[name].default:
                    raise TrainConfigError(f"{name} is an option of `ernie-train dpo`, not {self.mode}")

    def _validate_dpo(self) -> None:
        from ernie_train.dpo import LOSS_TYPES, REFERENCE_FREE
        if self.model is None:
            raise TrainConfigError("ernie-train dpo needs --model DIR: preference tuning starts from a model "
                                   "(usually the SFT checkpoint)")
        if self.loss_type not in LOSS_TYPES:
            raise TrainConfigError(f"--loss-type {self.loss_type!r} is unknown; choose one of {', '.join(LOSS_TYPES)}")
        refs = [f for f in ("ref_logps", "ref_model", "reference_free") if getattr(self, f)]
        if len(refs) > 1:
            raise TrainConfigError("pass at most one of --ref-logps, --ref-model, --reference-free")
        free = self.loss_type in REFERENCE_FREE
        if self.reference_free and not free:
            raise TrainConfigError(f"--reference-free: loss type {self.loss_type} needs a reference; use "
                                   f"{' or '.join(REFERENCE_FREE)}, or drop --reference-free")
        if free and (self.ref_logps or self.ref_model):
            raise TrainConfigError(f"loss type {self.loss_type} is reference-free; drop --ref-logps/--ref-model")
        if self.beta <= 0:
            raise TrainConfigError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise TrainConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type not in ("sigmoid", "simpo"):
            raise TrainConfigError(f"--label-smoothing applies to sigmoid and simpo, not {self.loss_type}")
        for name in ("sft_loss_ratio", "pref_loss_ratio", "dpop_lambda", "simpo_gamma", "offset_alpha"):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.offset_alpha > 0:
            raise TrainConfigError("--offset-alpha needs per-pair score deltas (ERNIEKit's 'sort' values), which "
                                   "ernie-pack dpo does not store yet; leave it at 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
DPO_FIELDS = tuple(FIELDS)[tuple(FIELDS).index("loss_type"):]


def load_yaml(path: str) -> dict:
    """Options from a YAML file (snake_case keys, as the CLI's long names). Unknown keys are an error."""
    import yaml
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise TrainConfigError(f"{path}: not found") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise TrainConfigError(f"{path}{':' + str(line + 1) if line is not None else ''}: invalid YAML "
                               f"({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: expected a mapping of option names to values")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS or name == "mode":
            raise TrainConfigError(f"{path}: unknown option {key!r}; see `ernie-train pretrain --help`")
        out[name] = value
    return out


def resolve(mode: str, file_values: dict, explicit: dict) -> TrainConfig:
    """Defaults < config file < explicit command-line flags."""
    values = {**file_values, **explicit, "mode": mode}
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise TrainConfigError(str(e)) from None
    for name in FIELDS:
        setattr(cfg, name, _coerce(name, getattr(cfg, name)))
    for name in ("data", "eval_data", "model", "output_dir", "tokenizer", "visualdl_logdir", "ref_logps", "ref_model",
                 "eval_ref_logps"):
        v = getattr(cfg, name)
        if v:
            setattr(cfg, name, os.path.expanduser(str(v)))
    cfg.validate()
    return cfg


_CASTS = {"int": int, "float": float, "bool": bool, "str": str}


def _coerce(name: str, value):
    """YAML is loose (PyYAML reads `3e-4` as a string): cast to the field's type or fail in one line."""
    cast = _CASTS.get(FIELDS[name].type.split("|")[0].strip())
    if value is None or cast is None:
        return value
    if cast is bool:
        if isinstance(value, bool):
            return value
        raise TrainConfigError(f"option {name}: expected true or false, got {value!r}")
    if isinstance(value, bool) or (cast is not str and not isinstance(value, (int, float, str))):
        raise TrainConfigError(f"option {name}: expected {cast.__name__}, got {value!r}")
    try:
        out = cast(value)
    except (TypeError, ValueError):
        raise TrainConfigError(f"option {name}: expected {cast.__name__}, got {value!r}") from None
    if cast is int and isinstance(value, float) and value != out:
        raise TrainConfigError(f"option {name}: expected an integer, got {value!r}")
    return out
