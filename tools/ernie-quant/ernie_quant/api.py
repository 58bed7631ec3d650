"""The ernie-quant API: `quantize(method, model, out, ...) -> QuantSummary`.

    1. check the options and the base (headers only): nothing is read or written before they pass
    2. calibrate if needed: fp8 records each Linear's input amax (hooks, one pass); GPTQ runs layer by layer
    3. stream the weights tensor group by tensor group into OUTDIR (libernie.checkpoint.stream), atomically
    4. --eval: perplexity of the base and of the quantized model on held-out shards
No click and no printing here: progress goes through callbacks, the result is a dataclass.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from libernie.checkpoint import FORMAT_TAG
from libernie.checkpoint.names import rules
from libernie.checkpoint.sharded import atomic_dir, parse_size
from libernie.checkpoint.side_files import copy_side_files
from libernie.memory import peak_rss_mb
from libernie.paths import check_writable
from libernie.quant import BITS, DEFAULT_GROUP, FORMATS, METHODS
from libernie.quant.formats import hf_module, is_vocab, module_of, quantizable, quantization_config

from ernie_quant.errors import QuantError
from ernie_quant.stream import Job, Source, write

ALGOS = ("rtn", "gptq")


@dataclass
class QuantSummary:
    method: str
    format: str
    algo: str
    base: str
    out: str
    base_layout: str
    layout: str
    group_size: int | None
    skip: list[str]
    quantize_embeddings: bool          # the token embedding (and an untied lm_head) are wint8 per row too
    quantized: int                     # Linear weights quantized
    kept_float: list[str]              # decoder Linears left in float by --skip
    tensors: int
    shards: int
    bytes_before: int                  # tensor bytes of the base
    bytes_after: int                   # tensor bytes written
    compression: float
    seconds: float                     # whole run
    write_seconds: float               # the streaming pass alone
    mb_per_s: float                    # base bytes / write_seconds
    peak_rss_mb: float
    layer_error: dict                  # {Paddle weight name: ||W - W'|| / ||W||}
    max_layer_error: float
    mean_layer_error: float
    side_files: list[str]
    calib: dict | None = None          # {"prefix", "sequences", "tokens", "seconds"}
    eval: dict | None = None           # {"prefix", "sequences", "tokens", "base_ppl", "quant_ppl", "ppl_delta", ...}
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def quantize(method: str, model: str, out: str, *, calib: str | None = None, algo: str = "rtn",
             group_size: int | None = None, skip: tuple[str, ...] = (), fmt: str = "fastdeploy",
             eval_prefix: str | None = None, tokenizer: str | None = None, calib_samples: int = 128,
             eval_samples: int = 64, seq_len: int | None = None, max_shard_size="5GB", force: bool = False,
             quantize_embeddings: bool = False,
             progress: Callable[[str, int, int], None] | None = None) -> QuantSummary:
    """Quantize checkpoint `model` (fp32/bf16/fp16, either layout) with `method` into `out`.

    Args:
        method: "wint8" (per channel by default), "wint4" (groups of 128 by default) or "fp8" (tensor-wise e4m3).
        calib: ernie-pack dataset prefix; required by fp8 (static activation scales) and by GPTQ.
        algo: "rtn" (round to nearest, streaming) or "gptq" (wint8/wint4; needs calib).
        group_size: input columns per scale; -1 = one per output channel. Must divide every Linear's input width.
        skip: fnmatch patterns of Paddle module names (`ernie.layers.0.*`, `*.down_proj`) kept in float.
        fmt: "fastdeploy" (Paddle layout) or "compressed-tensors" (HF layout).
        eval_prefix: held-out ernie-pack prefix: report perplexity of base and quantized model.
        tokenizer: tokenizer the shards must have been packed with (default: the model directory's).
        calib_samples / eval_samples: sequences used; seq_len: cut sequences to this many tokens.
        quantize_embeddings: also quantize the token embedding and an untied lm_head (wint8 only; one scale
            per vocabulary row, round to nearest whatever `algo` says).
        progress: progress(stage, done, total) with stage "calibrate", "write", "eval".
    Raises QuantError / CheckpointError / ConfigError / ShardFormatError: one line, nothing left in `out`.
    """
    t0 = time.perf_counter()
    model, out = os.fspath(model), os.fspath(out)
    group_size = _check_options(method, algo, fmt, calib, group_size)
    if quantize_embeddings and method != "wint8":
        raise QuantError(f"--quantize-embeddings works with wint8 only (one int8 scale per vocabulary row), not "
                         f"{method}; drop it or use wint8")
    if quantize_embeddings and fmt == "compressed-tensors":
        raise QuantError("--quantize-embeddings is fastdeploy-only: transformers 5.23 + compressed-tensors 0.20 "
                         "cannot load a quantized embedding; use --format fastdeploy or drop --quantize-embeddings")
    max_bytes = parse_size(max_shard_size)
    if os.path.abspath(out) == os.path.abspath(model):
        raise QuantError(f"{out}: is the input model directory; write the quantized model somewhere else")
    if os.path.exists(out) and not force:
        raise QuantError(f"{out}: already exists; choose another path or pass --force")
    check_writable(out, is_dir=True)  # before the model or any data is read: a typo fails at once
    src = Source.open(model)
    src.check()
    if calib or eval_prefix:  # Paddle is imported only when there is data to run; RTN alone streams without it
        from ernie_quant import data as qdata
    chosen = _choose(src, method, group_size, tuple(skip))
    if quantize_embeddings:
        chosen += [r for r in rules(src.cfg) if quantizable(r, embeddings=True) and not quantizable(r)]
    # round-to-nearest integers need no data: a --calib given with them is checked but not run
    calib_ds = qdata.open_dataset(calib, src.cfg, model, tokenizer, "calibration") if calib else None
    if method != "fp8" and algo == "rtn":
        calib_ds = None
    eval_ds = qdata.open_dataset(eval_prefix, src.cfg, model, tokenizer, "evaluation") if eval_prefix else None
    job = Job(method, fmt, group_size, {r.paddle for r in chosen})
    report = {}
    live = None
    # The float model is built only for --eval and GPTQ; fp8 calibration streams layer by layer from the file.
    if eval_ds is not None or (calib_ds is not None and algo == "gptq"):
        from libernie.model import ErnieForCausalLM
        live = ErnieForCausalLM.from_pretrained(model)
    if eval_ds is not None:
        t = time.perf_counter()
        base_ppl, tokens = qdata.perplexity(live, _stage(progress, "eval", qdata.batches(eval_ds, eval_samples,
                                                                                       seq_len), eval_samples))
        report["eval"] = {"prefix": eval_prefix, "sequences": min(eval_samples, len(eval_ds)), "tokens": tokens,
                          "base_ppl": base_ppl, "base_seconds": round(time.perf_counter() - t, 3)}
    if calib_ds is not None:
        # hidden states between layers spill next to OUTDIR (its file system must hold the output anyway)
        report["calib"] = _calibrate(live, job, calib_ds, calib, chosen, calib_samples, seq_len, progress, src,
                                     os.path.dirname(os.path.abspath(out)))
    live = None  # the float model is not needed past here: free it before streaming
    t_write = time.perf_counter()
    try:
        with atomic_dir(out, overwrite=force) as tmp:
            side = copy_side_files(model, tmp)
            meta = {"format": FORMAT_TAG[job.layout], "ernie_tools": "quant", "quant_method": method}
            index, errors, before = write(src, job, tmp, max_bytes, meta,
                                          (lambda d, t, n: progress("write", d, t)) if progress else None)
            skipped_hf = _skipped_hf(src, chosen)
            qc = quantization_config(method, fmt, algo=algo, group_size=group_size, skip=list(skip),
                                     skipped_hf=skipped_hf, n_quantized=len(chosen), base=os.path.abspath(model),
                                     embeddings=quantize_embeddings, tied=src.cfg.tie_word_embeddings)
            out_cfg = dataclasses.replace(src.cfg, extra={**src.cfg.extra, "quantization_config": qc})
            out_cfg.save(tmp, job.layout)
    except OSError as e:
        raise QuantError(f"{e.filename or out}: {e.strerror or e}; check the path, its permissions and the free "
                         "space") from None
    write_seconds = time.perf_counter() - t_write
    rss = peak_rss_mb()
    if eval_ds is not None:
        from libernie.model import ErnieForCausalLM
        t = time.perf_counter()
        qmodel = ErnieForCausalLM.from_pretrained(out)
        ppl, _ = qdata.perplexity(qmodel, _stage(progress, "eval", qdata.batches(eval_ds, eval_samples, seq_len),
                                                 eval_samples))
        ev = report["eval"]
        ev.update(quant_ppl=ppl, ppl_delta=ppl - ev["base_ppl"],
                  ppl_delta_pct=100.0 * (ppl - ev["base_ppl"]) / ev["base_ppl"],
                  quant_seconds=round(time.perf_counter() - t, 3))
    after = index["metadata"]["total_size"]
    errs = list(errors.values()) or [0.0]
    all_linear = [r for r in rules(src.cfg) if quantizable(r)]
    return QuantSummary(
        method=method, format=fmt, algo=algo, base=model, out=out, base_layout=src.reader.layout,
        layout=job.layout, group_size=None if method == "fp8" else group_size, skip=list(skip),
        quantize_embeddings=quantize_embeddings,
        quantized=len(chosen), kept_float=[module_of(r) for r in all_linear if r.paddle not in job.quantized],
        tensors=len(index["weight_map"]), shards=len(set(index["weight_map"].values())),
        bytes_before=before, bytes_after=after, compression=round(before / max(after, 1), 3),
        seconds=round(time.perf_counter() - t0, 3), write_seconds=round(write_seconds, 3),
        mb_per_s=round(before / max(write_seconds, 1e-9) / 1e6, 1), peak_rss_mb=round(rss, 1),
        layer_error={k: round(v, 6) for k, v in errors.items()}, max_layer_error=round(max(errs), 6),
        mean_layer_error=round(sum(errs) / len(errs), 6), side_files=side, calib=report.get("calib"),
        eval=report.get("eval"),
        config={"method": method, "algo": algo, "format": fmt, "group_size": group_size, "skip": list(skip),
                "calib": calib, "eval": eval_prefix, "calib_samples": calib_samples, "eval_samples": eval_samples,
                "seq_len": seq_len, "max_shard_size": max_shard_size, "quantize_embeddings": quantize_embeddings})


def _check_options(method, algo, fmt, calib, group_size) -> int:
    if method not in METHODS:
        raise QuantError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    if fmt not in FORMATS:
        raise QuantError(f"unknown format {fmt!r}; use fastdeploy or compressed-tensors")
    if algo not in ALGOS:
        raise QuantError(f"unknown algorithm {algo!r}; use rtn or gptq")
    if method == "fp8":
        if algo != "rtn":
            raise QuantError("--algo gptq applies to wint8/wint4; fp8 is tensor-wise round to nearest")
        if group_size is not None:
            raise QuantError("--group-size applies to wint8/wint4; fp8 has one scale per tensor")
        if not calib:
            raise QuantError("fp8 needs --calib PREFIX (ernie-pack shards): its activation scales are static")
        return -1
    if algo == "gptq" and not calib:
        raise QuantError("--algo gptq needs --calib PREFIX (ernie-pack shards) to collect layer inputs")
    gs = DEFAULT_GROUP[method] if group_size is None else group_size
    if gs != -1 and gs < 2:
        raise QuantError(f"--group-size must be -1 (per channel) or >= 2, got {gs}")
    if gs != -1 and method == "wint4" and gs % 2:
        raise QuantError(f"--group-size {gs}: wint4 packs two values per byte, so groups must be even")
    return gs


def _choose(src: Source, method: str, group_size: int, skip: tuple[str, ...]) -> list:
    linears = [r for r in rules(src.cfg) if quantizable(r)]
    for pat in skip:  # a pattern that matches nothing is a typo, not a request
        if not any(not quantizable(r, (pat,)) for r in linears):
            raise QuantError(f"--skip {pat!r} matches no quantizable Linear of {src.path}; patterns match Paddle "
                             f"module names such as {module_of(linears[0])} (fnmatch: 'ernie.layers.0.*')")
    chosen = [r for r in linears if quantizable(r, skip)]
    if not chosen:
        raise QuantError(f"{src.path}: --skip leaves no Linear to quantize")
    for r in chosen:
        n_in = r.paddle_shape[0]
        if group_size != -1 and n_in % group_size:
            raise QuantError(f"{src.path}: --group-size {group_size} does not divide the input width {n_in} of "
                             f"{module_of(r)}; pick a divisor of {n_in} or -1 (per channel)")
        if method == "wint4" and n_in % 2:
            raise QuantError(f"{src.path}: {module_of(r)} has an odd input width {n_in}; wint4 needs it even")
    return chosen


def _skipped_hf(src: Source, chosen) -> list[str]:
    ids = {r.paddle for r in chosen}
    return [hf_module(n) for r in rules(src.cfg) if quantizable(r) and r.paddle not in ids for n in r.hf]


def _calibrate(live, job: Job, ds, prefix, chosen, n, seq_len, progress, src: Source, spill_dir: str) -> dict:
    from ernie_quant import data as qdata
    t = time.perf_counter()
    data = list(_stage(progress, "calibrate", qdata.batches(ds, n, seq_len), n))
    modules = [module_of(r) for r in chosen]
    if job.method == "fp8":
        job.act_amax, tokens = qdata.activation_amax_streaming(src, data, modules, str(ds.path), spill_dir)
    else:  # GPTQ
        from libernie.quant.gptq_model import gptq_model
        for b in data:
            qdata.check_ids(b, live.config.vocab_size, str(ds.path))
        wanted = {r.paddle for r in chosen if not is_vocab(r)}  # the vocabulary matrices stay RTN, per row
        job.gptq = gptq_model(live, data, bits=BITS[job.method], group_size=job.group_size,
                              skip=lambda name: name not in wanted and f"{name}.weight" not in wanted)
        tokens = sum(int(b["input_ids"].shape[1]) for b in data)
    return {"prefix": prefix, "sequences": len(data), "tokens": tokens, "seconds": round(time.perf_counter() - t, 3)}


def _stage(progress, stage: str, it, total: int):
    for i, x in enumerate(it):
        yield x
        if progress:
            progress(stage, i + 1, total)


