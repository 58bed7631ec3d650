"""The training loop: `train(TrainConfig) -> summary dict`. No printing; progress goes to a callback.

One optimizer step = gradient_accumulation_steps micro-batches on each of world_size ranks. The loss
is normalised by the number of target tokens in the whole global batch (all-reduced before the first
backward), so 2 processes and 1 process with the same global batch take the same step.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time

import paddle
import paddle.nn as nn

from libernie.config import PRESETS, ErnieConfig
from libernie.data import PackedDataset
from libernie.kernels import on_gpu
from libernie.lora import LoRAConfig, apply_lora, load_adapter
from libernie.model import ErnieForCausalLM, causal_lm_loss
from libernie.paths import check_writable
from libernie.tokenizer import ErnieTokenizer, resolve_tokenizer_file

from ernie_train import dist, optim, state
from ernie_train.config import TrainConfig, TrainConfigError
from ernie_train.data import StepBatches, collate, eval_batches
from ernie_train.guard import NonFiniteGuard
from ernie_train.moe import MoEHooks
from ernie_train.metrics import MetricsLog, peak_memory_mb, train_flops_per_token


class LossHead(nn.Layer):
    """Wraps the unchanged model so DataParallel sees a Layer that returns tensors: (loss sum, targets).
    `ernie-train dpo` uses ernie_train.dpo_head.DPOHead instead, with the same interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    @staticmethod
    def collate(ds, indices, seq_len):
        return collate(ds, indices, seq_len)

    def inputs(self, b, split: str = "train") -> tuple:
        return _t(b.input_ids), _t(b.position_ids), _t(b.doc_ids), _t(b.loss_mask)

    def forward(self, input_ids, position_ids, doc_ids, loss_mask):
        logits = self.model(input_ids, position_ids=position_ids, doc_ids=doc_ids).logits
        return causal_lm_loss(logits, input_ids, loss_mask=loss_mask, doc_ids=doc_ids, reduction="none")


def enable_recompute(model) -> None:
    """Recompute each decoder layer's activations in backward instead of storing them."""
    from paddle.distributed.fleet.utils import recompute
    for layer in model.ernie.layers:
        layer.forward = functools.partial(recompute, layer.forward, use_reentrant=False)


def _open_data(prefix: str, mode: str, verify: bool) -> PackedDataset:
    ds = PackedDataset(prefix)
    if ds.mode != mode:
        raise TrainConfigError(f"{ds.path}: packed for {ds.mode!r}, but this is `ernie-train {mode}`; "
                               f"pack with `ernie-pack {mode}`")
    if len(ds) == 0:
        raise TrainConfigError(f"{ds.path}: holds no sequences")
    if verify:
        ds.verify()
    return ds


def _tokenizer_dir(cfg: TrainConfig) -> str | None:
    """--tokenizer as given (a directory or any .model file: libernie's resolve_tokenizer_file, checked
    here before any work), else the model directory when it holds tokenizer.model."""
    if cfg.tokenizer:
        resolve_tokenizer_file(cfg.tokenizer)
        return cfg.tokenizer
    if cfg.model and os.path.isfile(os.path.join(cfg.model, "tokenizer.model")):
        return cfg.model
    return None


def _check_tokenizer(cfg: TrainConfig, ds: PackedDataset, tok_dir: str | None, model_cfg: ErnieConfig) -> None:
    if tok_dir is None:
        if cfg.init_config:
            raise TrainConfigError("--init-config needs --tokenizer PATH (written into every checkpoint)")
        return  # a model directory without tokenizer files: nothing to compare
    tok = ErnieTokenizer.from_pretrained(tok_dir)
    if ds.tokenizer_sha256 and tok.sha256 != ds.tokenizer_sha256:
        raise TrainConfigError(f"{ds.path}: packed with tokenizer sha256 {ds.tokenizer_sha256[:12]}…, but "
                               f"{tok_dir} has {tok.sha256[:12]}…; repack with this tokenizer or pass the other one")
    if tok.vocab_size > model_cfg.vocab_size:
        raise TrainConfigError(f"tokenizer vocab {tok.vocab_size} exceeds the model's vocab_size "
                               f"{model_cfg.vocab_size}")


def _init_config(spec: str, tok_dir: str | None) -> ErnieConfig:
    if spec in PRESETS:
        kwargs = {}
        if tok_dir and spec != "ernie-4.5-0.3b":
            kwargs["vocab_size"] = ErnieTokenizer.from_pretrained(tok_dir).vocab_size
        return PRESETS[spec](**kwargs)
    if os.path.isfile(spec) or os.path.isdir(spec):
        return ErnieConfig.from_file(spec)
    raise TrainConfigError(f"--init-config {spec!r}: neither a preset ({', '.join(sorted(PRESETS))}) nor a "
                           "config.json path")


def _build_model(cfg: TrainConfig, resume_dir: str | None, tok_dir: str | None):
    paddle.seed(cfg.seed)  # every random init (a model from scratch, LoRA's A matrices) follows --seed
    lora_cfg = None
    if cfg.lora:
        model = ErnieForCausalLM.from_pretrained(cfg.model)
        if resume_dir is None:
            lora_cfg = LoRAConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, use_rslora=cfg.rslora,
                                  lora_dropout=cfg.lora_dropout,
                                  target_modules=tuple(t.strip() for t in cfg.lora_target_modules.split(",") if t))
            apply_lora(model, lora_cfg)
        else:
            lora_cfg = load_adapter(model, resume_dir)
    elif resume_dir is not None:
        model = ErnieForCausalLM.from_pretrained(resume_dir)
    elif cfg.model:
        model = ErnieForCausalLM.from_pretrained(cfg.model)
    else:
        model = ErnieForCausalLM(_init_config(cfg.init_config, tok_dir))
    model.train()
    return model, lora_cfg


def _precision(model, opt):
    """The one dispatch point for mixed precision: bf16 AMP O2 with fp32 master weights on a GPU
    (not run in CI: no GPU here), plain fp32 on CPU."""
    if not on_gpu():
        return model, opt, contextlib.nullcontext
    model, opt = paddle.amp.decorate(models=model, optimizers=opt, level="O2", dtype="bfloat16", master_weight=True)
    return model, opt, functools.partial(paddle.amp.auto_cast, level="O2", dtype="bfloat16")


class _StopFlag:
    """SIGTERM / SIGUSR1 (Slurm preemption) ask for a checkpoint at the end of the current step."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _t(a):
    return paddle.to_tensor(a)


def evaluate(head, ds, cfg, seq_len, info) -> dict:
    head.eval()
    total = count = 0.0
    stats = None
    with paddle.no_grad():
        for b in eval_batches(ds, seq_len, cfg.per_device_eval_batch_size, cfg.eval_iters, info.rank,
                              info.world_size, collate_fn=head.collate):
            out = head(*head.inputs(b, "eval"))
            total, count = total + float(out[0]), count + float(out[1])
            if len(out) > 2:  # dpo: per-pair statistics
                stats = out[2].numpy() + (0 if stats is None else stats)
    head.train()
    total, count = dist.all_reduce_sum([total, count], info)
    loss = total / max(count, 1.0)
    if stats is not None:
        stats = dist.all_reduce_sum([float(x) for x in stats], info)
        return {"eval_loss": loss, **head.metrics(stats, count, "eval_"), "eval_pairs": int(count)}
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(count)}


def train(cfg: TrainConfig, on_log=None) -> dict:
    """Run the job described by cfg; returns the JSON summary. on_log(record) sees every metrics line."""
    cfg.validate()
    for out in (cfg.output_dir, cfg.visualdl_logdir):  # before any input is read: a typo fails at once
        if out:
            check_writable(out, is_dir=True)
    if cfg.visualdl_logdir:  # fail before any work or output, not at the first log line
        try:
            import visualdl  # noqa: F401
        except ImportError:
            raise TrainConfigError("--visualdl-logdir needs VisualDL: pip install visualdl") from None
    info = dist.init()
    t_start = time.perf_counter()
    ds = _open_data(cfg.data, cfg.mode, cfg.verify_data)
    eval_ds = _open_data(cfg.eval_data, cfg.mode, cfg.verify_data) if cfg.eval_data else None
    seq_len = cfg.max_seq_len or ds.seq_len
    if cfg.mode == "dpo" and seq_len != ds.seq_len:
        raise TrainConfigError(f"--max-seq-len {seq_len}: DPO pairs are never cut, so it must equal the shards' "
                               f"seq_len {ds.seq_len} ({ds.path}); repack with --seq-len {seq_len}")
    if seq_len > ds.seq_len:
        raise TrainConfigError(f"--max-seq-len {seq_len} is larger than the shards' seq_len {ds.seq_len} "
                               f"({ds.path}); repack with --seq-len {seq_len} or lower --max-seq-len")
    resume_dir = state.latest(cfg.output_dir) if cfg.resume else None
    if not cfg.resume and state.complete(cfg.output_dir):
        raise TrainConfigError(f"{cfg.output_dir}: already holds checkpoints; pass --resume to continue, or "
                               "choose a new output directory")
    tok_dir = _tokenizer_dir(cfg)
    model, lora_cfg = _build_model(cfg, resume_dir, tok_dir)
    _check_tokenizer(cfg, ds, tok_dir, model.config)
    moe = MoEHooks(model, cfg, info)
    if cfg.recompute:
        enable_recompute(model)
    if cfg.mode == "dpo":
        from ernie_train.dpo_head import DPOHead, build_reference
        head = DPOHead(model, cfg, *build_reference(cfg, model, ds, eval_ds))
    else:
        head = LossHead(model)
    opt, params = optim.build(model, cfg)
    batches = StepBatches(ds, seq_len, cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps,
                          info.rank, info.world_size, cfg.seed, collate_fn=head.collate)
    start_step, tokens_seen = 0, 0
    guard = NonFiniteGuard(cfg.skip_nan_inf_steps)
    if resume_dir is not None:
        st = state.read_state(resume_dir)
        if st.get("global_batch") != batches.global_batch or st.get("seed") != cfg.seed:
            raise TrainConfigError(f"{resume_dir}: written with global batch {st.get('global_batch')} and seed "
                                   f"{st.get('seed')}; resume with the same (now {batches.global_batch}, {cfg.seed})")
        optim.load_state(opt, params, os.path.join(resume_dir, state.OPTIM_FILE))
        start_step, tokens_seen = st["step"], st["tokens_seen"]
        guard.skipped = st.get("skipped_steps", 0)
    model, opt, autocast = _precision(model, opt)
    head.model = model
    runner = paddle.DataParallel(head) if info.world_size > 1 else head
    if info.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)
        with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    log = MetricsLog(cfg.output_dir, start_step, cfg.visualdl_logdir) if info.is_main else None
    flops_tok = train_flops_per_token(model.config, seq_len)
    final_loss, dpo_metrics = None, {}
    ckpt_path, stopped, eval_metrics = resume_dir, None, {}
    t_log, tok_log, done = time.perf_counter(), 0, start_step

    def save(step_done):
        st = {"step": step_done, "tokens_seen": tokens_seen, "global_batch": batches.global_batch,
              "seed": cfg.seed, "skipped_steps": guard.skipped, "world_size": info.world_size, "mode": cfg.mode,
              "data": cfg.data,
              "data_position": step_done * batches.global_batch,
              "epoch": batches.sampler.epoch(step_done * batches.global_batch),
              "rng": "paddle.seed(seed * 1000003 + step) before each step; data order from (seed, epoch)",
              "config": cfg.to_dict()}
        path = None
        if info.is_main:
            path = state.save(cfg.output_dir, step_done, model, opt, params, st, cfg, tok_dir, lora_cfg)
        if info.world_size > 1:
            paddle.distributed.barrier()
        return path or os.path.join(cfg.output_dir, state.name(step_done))

    with _StopFlag() as stop:
        for step in range(start_step, cfg.max_steps):
            paddle.seed(cfg.seed * 1000003 + step)  # dropout (LoRA) draws depend only on the step
            lr = optim.lr_at(step, lr=cfg.learning_rate, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                             total=cfg.max_steps, kind=cfg.lr_scheduler_type)
            opt.set_lr(lr)
            micro = batches(step)
            local_targets = sum(b.targets for b in micro)
            local_tokens = sum(int((b.doc_ids >= 0).sum()) for b in micro)
            n_global, tok_global = dist.all_reduce_sum([local_targets, local_tokens], info)
            scale = info.world_size / max(n_global, 1.0)
            loss_sum, stats = 0.0, None
            for k, b in enumerate(micro):
                sync = k == len(micro) - 1 or info.world_size == 1
                ctx = contextlib.nullcontext() if sync else runner.no_sync()
                with ctx, autocast():
                    inputs = head.inputs(b)
                    moe.before_forward(inputs[2])          # doc_ids: both heads pass them third
                    out = runner(*inputs)
                    with moe.backward_context():
                        moe.loss(out[0] * scale, len(micro)).backward()
                loss_sum += float(out[0])
                if len(out) > 2:  # dpo: per-pair statistics (rewards, accuracies, log-probs)
                    stats = out[2].numpy() + (0 if stats is None else stats)
            grad_norm = optim.clip_grad_norm(params, cfg.max_grad_norm)
            loss_sum, bad_grads = dist.all_reduce_sum([loss_sum, guard.local_flag(grad_norm)], info)
            loss = loss_sum / max(n_global, 1.0)
            verdict = guard.verdict(loss, bad_grads)  # the same on every rank: computed from reduced values
            if verdict == "ok":
                opt.step()
            opt.clear_grad()
            moe.after_step(verdict == "ok", len(micro))
            if stats is not None:  # every rank of a dpo run has them: one more all-reduce, same on all
                dpo_metrics = head.metrics(dist.all_reduce_sum([float(x) for x in stats], info), n_global)
            tokens_seen += int(tok_global)
            tok_log += int(tok_global)
            final_loss = loss
            done = step + 1
            flag = dist.all_reduce_sum([1.0 if stop.signal else 0.0], info)[0] > 0
            if eval_ds is not None and cfg.eval_steps and done % cfg.eval_steps == 0:
                eval_metrics = evaluate(head, eval_ds, cfg, seq_len, info)
            if done % cfg.logging_steps == 0 or done == cfg.max_steps or flag or verdict != "ok":
                dt = max(time.perf_counter() - t_log, 1e-9)
                rec = {"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_log / dt,
                       "tokens_seen": tokens_seen, "epoch": batches.sampler.epoch(done * batches.global_batch),
                       "memory_mb": peak_memory_mb(), "skipped_steps": guard.skipped, **dpo_metrics,
                       **moe.metrics()}
                if cfg.peak_tflops:
                    rec["mfu"] = flops_tok * tok_log / dt / (cfg.peak_tflops * 1e12 * info.world_size)
                if eval_ds is not None and cfg.eval_steps and done % cfg.eval_steps == 0:
                    rec.update(eval_metrics)
                if log:
                    log.write(rec)
                if on_log:
                    on_log(rec)
                t_log, tok_log = time.perf_counter(), 0
            if verdict == "stop":
                if log:
                    log.close()
                raise guard.error(done, loss, grad_norm, ckpt_path)
            if (cfg.save_steps and done % cfg.save_steps == 0) or done == cfg.max_steps or flag:
                ckpt_path = save(done)
            if flag:
                stopped = stop.signal or "signal on another rank"
                break
    if eval_ds is not None and not stopped:
        eval_metrics = evaluate(head, eval_ds, cfg, seq_len, info)
    if log:
        log.close()
    seconds = time.perf_counter() - t_start
    return {"mode": cfg.mode, "steps": done, "start_step": start_step,
            "final_loss": final_loss, **dpo_metrics, **eval_metrics, "tokens_seen": tokens_seen,
            "skipped_steps": guard.skipped, "seconds": round(seconds, 3),
            "checkpoint": ckpt_path, "output_dir": cfg.output_dir, "stopped": stopped,
            "world_size": info.world_size, "lora": cfg.lora, "config": cfg.to_dict()}
