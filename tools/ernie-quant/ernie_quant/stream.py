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
from libernie.quant.formats import QUANT_MARKERS, QuantResult, planned, quantizable, tensors_for
from libernie.quant.fp8 import decode_e4m3, quantize_fp8

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

    def read_paddle_f32(self, rule: Rule) -> np.ndarray:
        """The rule's tensor in Paddle orientation, float32 (one group in memory)."""
        parts = [widen(read_array(self.files[n], n), self.files[n].dtype(n)) for n in self.names(rule)]
        return parts[0] if self.reader.layout == "paddle" else to_paddle(rule, parts)

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


def quantize_rule(w: np.ndarray, job: Job, rule: Rule) -> tuple[QuantResult, float]:
    """Paddle-orientation float32 weight [in, out] -> (QuantResult, relative Frobenius error of the dequant)."""
    from libernie.quant.gptq import dequantize, rtn_quantize
    wt = w.T                                                                  # [out, in], HF orientation
    if job.method == "fp8":
        codes, scale = quantize_fp8(wt)
        module = rule.paddle[: -len(".weight")]
        amax = (job.act_amax or {}).get(module, 0.0)
        act = np.float32(amax / 448.0) if amax > 0 else np.float32(1.0)
        res = QuantResult("fp8", codes, np.array([scale], np.float32), np.array([act], np.float32))
        deq = decode_e4m3(codes) * scale
    else:
        bits = BITS[job.method]
        if job.gptq is not None and rule.paddle in job.gptq:
            q, scale = job.gptq[rule.paddle]
        else:
            q, scale = rtn_quantize(wt, bits, job.group_size)
        res = QuantResult(job.method, q, np.asarray(scale, np.float32), None, job.group_size)
        deq = dequantize(q, scale, wt.shape[1] if job.group_size == -1 else job.group_size)
    den = float(np.linalg.norm(wt))
    err = float(np.linalg.norm(deq - wt)) / den if den > 0 else 0.0
    return res, err


def write(src: Source, job: Job, tmp: str, max_bytes: int, meta: dict, progress=None) -> tuple[dict, dict, int]:
    """Every tensor of `src` into `tmp` as `job` says. Returns (index, {Paddle name: relative error}, bytes read)."""
    entries = plan(src, job)
    writer = StreamingWriter(tmp, entries, max_bytes, meta)
    errors, done = {}, 0
    total = sum(src.nbytes(r) for r in src.ordered_rules())
    try:
        for i, rule in enumerate(src.ordered_rules()):
            if rule.paddle in job.quantized:
                res, errors[rule.paddle] = quantize_rule(src.read_paddle_f32(rule), job, rule)
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
