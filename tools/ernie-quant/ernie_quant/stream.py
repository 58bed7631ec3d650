"""The streaming writer of ernie-quant: base tensors are read one Paddle tensor group at a time (plain reads,
in the base's shard order), quantized or passed through, and written straight into output shards planned up
front (libernie.checkpoint.stream), so peak memory is about one tensor group whatever the model's size."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from libernie.checkpoint.names import Rule, ignorable, rules, to_hf, to_paddle
from libernie.checkpoint.safetensors_io import SafetensorsFile
from libernie.checkpoint.sharded import INDEX, SINGLE, CheckpointReader
from libernie.checkpoint.stream import Entry, StreamingWriter, read_array, tensor_span, widen
from libernie.config import ErnieConfig
from libernie.errors import CheckpointError
from libernie.quant import BITS
from libernie.quant.formats import QUANT_MARKERS, QuantResult, module_of, planned, tensors_for
from libernie.quant.fp8 import decode_e4m3, encode_e4m3, tensor_scale

_SKIP_SUFFIXES = (".safetensors", ".partial", ".safetensors.index.json", ".bin", ".pdparams", ".pdopt", ".pt",
                  ".pth", ".ckpt")


@dataclass
class Source:
    """A base checkpoint seen as tensor groups: config, reader, one SafetensorsFile per tensor name."""
    path: str
    cfg: ErnieConfig
    reader: CheckpointReader
    files: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str) -> "Source":
        cfg = ErnieConfig.from_file(path)
        reader = CheckpointReader(path)
        by_path, files = {}, {}
        for name in reader.keys():
            p = reader.file_of(name)
            files[name] = by_path.setdefault(p, SafetensorsFile(p))
        return cls(path, cfg, reader, files)

    def names(self, rule: Rule) -> list[str]:
        return [rule.paddle] if self.reader.layout == "paddle" else list(rule.hf)

    def shapes(self, rule: Rule) -> list[tuple]:
        return [rule.paddle_shape] if self.reader.layout == "paddle" else rule.hf_shapes()

    def check(self) -> None:
        """Names, shapes and dtypes from the headers only: a float checkpoint config.json describes."""
        where = self.reader.path
        quant = [n for n in self.reader.keys() if n.endswith(QUANT_MARKERS) or
                 self.files[n].dtype(n).startswith("F8")]
        if self.cfg.extra.get("quantization_config") is not None or quant:
            first = quant[0] if quant else "config.json quantization_config"
            raise CheckpointError(f"{where}: already quantized ({first}); quantize the float model it came from")
        table = rules(self.cfg)
        known = {n for r in table for n in self.names(r)}
        extra = sorted(n for n in self.reader.keys() if n not in known and not ignorable(n, self.cfg))
        if extra:
            raise CheckpointError(f"{where}: {len(extra)} tensor(s) config.json does not describe, first {extra[0]}; "
                                  "check num_hidden_layers, use_bias and tie_word_embeddings")
        for r in table:
            for name, shape in zip(self.names(r), self.shapes(r)):
                if name not in self.files:
                    raise CheckpointError(f"{where}: missing tensor {name}; the checkpoint is incomplete")
                sf = self.files[name]
                if sf.shape(name) != tuple(shape):
                    raise CheckpointError(f"{sf.path}: tensor {name} has shape {list(sf.shape(name))}, config.json "
                                          f"implies {list(shape)}; config and weights disagree")
                if sf.dtype(name) not in ("F32", "F16", "BF16"):
                    raise CheckpointError(f"{sf.path}: tensor {name} is {sf.dtype(name)}; ernie-quant takes fp32, "
                                          "fp16 or bf16 checkpoints")

    def ordered_rules(self) -> list[Rule]:
        """Every rule, in the order the base's shards hold its first tensor (sequential reads)."""
        shard_no = {f: i for i, f in enumerate(sorted(set(self.reader.weight_map.values())))}

        def key(r):
            n = self.names(r)[0]
            return shard_no[self.reader.weight_map[n]], tensor_span(self.files[n], n)[0]
        return sorted(rules(self.cfg), key=key)

    def read_hf_f32(self, rule: Rule) -> np.ndarray:
        """A Linear rule's weight as one float32 [out, in] matrix (HF orientation; fused parts stacked by rows).
        A Paddle [in, out] tensor is transposed in its storage dtype (half the bytes of fp32 for bf16)."""
        names = self.names(rule)
        dt = self.files[names[0]].dtype(names[0])
        if self.reader.layout == "paddle":
            return widen(np.ascontiguousarray(read_array(self.files[names[0]], names[0]).T), dt)
        parts = [widen(read_array(self.files[n], n), self.files[n].dtype(n)) for n in names]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def nbytes(self, rule: Rule) -> int:
        return sum(tensor_span(self.files[n], n)[1] for n in self.names(rule))


@dataclass
class Job:
    """What to write: method, output format, integer group size, which rules are quantized."""
    method: str
    fmt: str
    group_size: int
    quantized: set                     # Paddle names of the quantized rules
    act_amax: dict | None = None       # fp8: {Paddle module: max |input|}
    gptq: dict | None = None           # {Paddle name: (q [out, in], scale [out, G])} from GPTQ

    @property
    def layout(self) -> str:
        return "paddle" if self.fmt == "fastdeploy" else "hf"


def float_outputs(src: Source, rule: Rule, layout: str) -> list[tuple[str, str, tuple]]:
    dts = [src.files[n].dtype(n) for n in src.names(rule)]
    if layout == "paddle":
        return [(rule.paddle, dts[0], tuple(rule.paddle_shape))]
    dts = dts if src.reader.layout == "hf" else dts * len(rule.hf)
    return [(n, dt, tuple(s)) for n, dt, s in zip(rule.hf, dts, rule.hf_shapes())]


def plan(src: Source, job: Job) -> list[Entry]:
    entries = []
    for r in src.ordered_rules():
        outs = planned(r, job.method, job.fmt, job.group_size) if r.paddle in job.quantized \
            else float_outputs(src, r, job.layout)
        entries += [Entry(n, dt, tuple(s)) for n, dt, s in outs]
    return entries


_BLOCK_ELEMS = 1 << 16  # rows per block so that one block (float64 inside rtn_quantize) stays in L2


def quantize_rule(wt: np.ndarray, job: Job, rule: Rule) -> tuple[QuantResult, float]:
    """float32 weight [out, in] -> (QuantResult, relative Frobenius error ||W - W'|| / ||W||).

    Rows are independent (groups never cross a row), so the work goes in blocks of rows that fit in cache:
    several times faster than whole-tensor passes, and the temporaries stay small.
    """
    from libernie.quant.gptq import dequantize, rtn_quantize
    n_out, n_in = wt.shape
    rows = max(1, _BLOCK_ELEMS // n_in)
    err2 = ref2 = 0.0
    if job.method == "fp8":
        codes, scale = np.empty((n_out, n_in), np.uint8), tensor_scale(np.max(np.abs(wt)) if wt.size else 0.0)
        for i in range(0, n_out, rows):
            blk = wt[i:i + rows]
            codes[i:i + rows] = encode_e4m3(blk / scale)
            d = decode_e4m3(codes[i:i + rows]) * scale - blk
            err2, ref2 = err2 + float(np.vdot(d, d)), ref2 + float(np.vdot(blk, blk))
        amax = (job.act_amax or {}).get(module_of(rule), 0.0)
        res = QuantResult("fp8", codes, np.array([scale], np.float32), np.array([tensor_scale(amax)], np.float32))
    else:
        bits, gs = BITS[job.method], job.group_size
        g = n_in if gs == -1 else gs
        if job.gptq is not None and rule.paddle in job.gptq:
            q, scale = job.gptq[rule.paddle]
            q, scale = np.asarray(q, np.int8), np.asarray(scale, np.float32)
        else:
            q, scale = np.empty((n_out, n_in), np.int8), np.empty((n_out, n_in // g), np.float32)
            for i in range(0, n_out, rows):
                q[i:i + rows], scale[i:i + rows] = rtn_quantize(wt[i:i + rows], bits, gs)
        for i in range(0, n_out, rows):
            blk = wt[i:i + rows]
            d = dequantize(q[i:i + rows], scale[i:i + rows], g) - blk
            err2, ref2 = err2 + float(np.vdot(d, d)), ref2 + float(np.vdot(blk, blk))
        res = QuantResult(job.method, q, scale, None, gs)
    return res, (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0


def write(src: Source, job: Job, tmp: str, max_bytes: int, meta: dict, progress=None) -> tuple[dict, dict, int]:
    """Every tensor of `src` into `tmp` as `job` says. Returns (index, {Paddle name: relative error}, bytes read)."""
    entries = plan(src, job)
    writer = StreamingWriter(tmp, entries, max_bytes, meta)
    errors, done = {}, 0
    total = sum(src.nbytes(r) for r in src.ordered_rules())
    try:
        for i, rule in enumerate(src.ordered_rules()):
            if rule.paddle in job.quantized:
                res, errors[rule.paddle] = quantize_rule(src.read_hf_f32(rule), job, rule)
                for name, arr, dt in tensors_for(rule, res, job.fmt):
                    writer.write(name, np.ascontiguousarray(arr), dt)
            elif src.reader.layout == job.layout or rule.kind == "same":
                outs = float_outputs(src, rule, job.layout)
                for (name, _, _), srcname in zip(outs, src.names(rule)):
                    writer.copy(name, src.files[srcname], srcname)
            else:                                               # layout conversion of a float tensor, bits moved
                arrays = [read_array(src.files[n], n) for n in src.names(rule)]
                dt = src.files[src.names(rule)[0]].dtype(src.names(rule)[0])
                w = arrays[0] if src.reader.layout == "paddle" else to_paddle(rule, arrays)
                produced = [w] if job.layout == "paddle" else to_hf(rule, w)
                for arr, (name, _, _) in zip(produced, float_outputs(src, rule, job.layout)):
                    writer.write(name, arr, dt)
            done += src.nbytes(rule)
            if progress:
                progress(done, total, i + 1)
        index = writer.close()
    finally:
        writer.release()
    return index, errors, total


def copy_side_files(src_dir: str, dst_dir: str) -> list[str]:
    """Tokenizer, chat template, generation config...: every regular file but weights and config.json."""
    copied = []
    for fname in sorted(os.listdir(src_dir)):
        p = os.path.join(src_dir, fname)
        if (fname in (INDEX, SINGLE, "config.json") or fname.endswith(_SKIP_SUFFIXES) or fname.startswith(".")
                or not os.path.isfile(p)):
            continue
        shutil.copy2(p, os.path.join(dst_dir, fname))
        copied.append(fname)
    return copied
