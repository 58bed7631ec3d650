"""The streaming writer of ernie-quant: base tensors are read one Paddle tensor group at a time (plain reads,
in the base's shard order), quantized or passed through, and written straight into output shards planned up
front (libernie.checkpoint.stream), so peak memory is about one tensor group whatever the model's size."""
from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from libernie.checkpoint.names import Rule, ignorable, rules, to_hf, to_paddle
from libernie.checkpoint.safetensors_io import SafetensorsFile
from libernie.checkpoint.sharded import CheckpointReader
from libernie.checkpoint.stream import Entry, StreamingWriter, read_array, tensor_span, widen
from libernie.config import ErnieConfig
from libernie.errors import CheckpointError, ErnieError
from libernie.quant import BITS
from libernie.quant.formats import EMBEDDING, QUANT_MARKERS, QuantResult, module_of, planned, rule_group, tensors_for
from libernie.quant.fp8 import decode_e4m3, encode_e4m3, tensor_scale

from ernie_quant.blocks import _BLOCK_ELEMS, _NON_FINITE, _map, reuse_freed_memory
from ernie_quant.errors import QuantError
from ernie_quant.stored import map_array, quantize_stored


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

    def linear_rows(self, rule: Rule):
        """(n_out, n_in, rows(r0, r1)) for a Linear rule: rows(r0, r1) gives float32 rows r0..r1 of the weight
        in HF orientation [out, in] (fused parts stacked by rows), widened block by block from the storage read
        once. A Paddle [in, out] tensor is never transposed whole: each block is a column slice of it."""
        names = self.names(rule)
        parts = [(read_array(self.files[n], n), self.files[n].dtype(n)) for n in names]
        if rule.paddle == EMBEDDING:                # [V, h] in both layouts: already [out, in] for the head
            (store, dt), = parts
            return store.shape[0], store.shape[1], lambda r0, r1: widen(store[r0:r1], dt)
        n_in, n_out = rule.paddle_shape
        if self.reader.layout == "paddle":
            store, dt = parts[0]
            return n_out, n_in, lambda r0, r1: widen(store[:, r0:r1].T, dt)
        starts = np.cumsum([0] + [p.shape[0] for p, _ in parts])

        def rows(r0, r1):
            out = []
            for (p, dt), lo, hi in zip(parts, starts[:-1], starts[1:]):
                a, b = max(r0, lo), min(r1, hi)
                if a < b:
                    out.append(widen(p[a - lo:b - lo], dt))
            return out[0] if len(out) == 1 else np.concatenate(out, axis=0)
        return n_out, n_in, rows

    def stored(self, rule: Rule) -> tuple[np.ndarray, str]:
        """(storage array [in, out], safetensors dtype) of a Linear rule of a Paddle-layout base, mapped
        read-only from the file (bf16 as uint16; stored.map_array): what quantize_stored takes."""
        (name,) = self.names(rule)
        return map_array(self.files[name], name), self.files[name].dtype(name)

    def read_paddle_f32(self, rule: Rule) -> np.ndarray:
        """Any rule's tensor in Paddle orientation, float32, read with plain reads (no memory map, so nothing
        stays resident once the caller drops it)."""
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
        outs = planned(r, job.method, job.fmt, rule_group(r, job.group_size)) if r.paddle in job.quantized \
            else float_outputs(src, r, job.layout)
        entries += [Entry(n, dt, tuple(s)) for n, dt, s in outs]
    return entries


def _finite(rows):
    def checked(r0, r1):
        blk = rows(r0, r1)
        if not np.isfinite(blk).all():
            raise QuantError(_NON_FINITE)
        return blk
    return checked


def quantize_rule(n_out: int, n_in: int, rows, job: Job, rule: Rule) -> tuple[QuantResult, float]:
    """A Linear weight given as rows(r0, r1) -> float32 [r1 - r0, in] (HF orientation) -> (QuantResult,
    relative Frobenius error ||W - W'|| / ||W||).

    Rows are independent (groups never cross a row), so the work goes in blocks of rows that fit in cache,
    spread over a few threads, each writing its own slice of the preallocated outputs; temporaries stay small.
    For the Paddle layout the result is built transposed block by block (QuantResult.qt): no whole-tensor
    transpose ever happens.
    """
    from libernie.quant.gptq import dequantize, rtn_float32
    rows = _finite(rows)
    step = max(16, _BLOCK_ELEMS // n_in)
    blocks = [(i, min(i + step, n_out)) for i in range(0, n_out, step)]
    paddle_out = job.fmt == "fastdeploy" and rule.paddle != EMBEDDING   # the embedding stays [V, h]
    shape = (n_in, n_out) if paddle_out else (n_out, n_in)

    def put(dst, r0, r1, blk):
        if paddle_out:
            dst[:, r0:r1] = blk.T
        else:
            dst[r0:r1] = blk

    if job.method == "fp8":
        amax = max(_map(lambda b: float(np.max(np.abs(rows(*b)))), blocks))   # pass 1: the one scale
        scale = tensor_scale(amax)
        codes = np.empty(shape, np.uint8)

        def fp8_block(b):
            blk = rows(*b)
            c = encode_e4m3(blk / scale)
            put(codes, *b, c)
            d = decode_e4m3(c) * scale - blk
            return float(np.vdot(d, d)), float(np.vdot(blk, blk))
        sums = _map(fp8_block, blocks)
        act = tensor_scale((job.act_amax or {}).get(module_of(rule), 0.0))
        res = QuantResult("fp8", None if paddle_out else codes, np.array([scale], np.float32),
                          np.array([act], np.float32), qt=codes if paddle_out else None)
    else:
        bits, gs = BITS[job.method], job.group_size
        g = n_in if gs == -1 else gs
        given = job.gptq.get(rule.paddle) if job.gptq is not None else None
        q, scale = np.empty(shape, np.int8), np.empty((n_out, n_in // g), np.float32)

        def int_block(b):
            r0, r1 = b
            blk = rows(r0, r1)
            if given is not None:
                qb, sb = np.asarray(given[0][r0:r1], np.int8), np.asarray(given[1][r0:r1], np.float32)
                d = dequantize(qb, sb, g)
            else:                       # rtn_quantize's float32 path, keeping q as floats for the error
                d, sb = rtn_float32(blk, bits, gs)
                qb = d.astype(np.int8)
                d = d.reshape(r1 - r0, n_in // g, g)
                d *= sb[:, :, None]     # == dequantize(qb, sb, g): the same float32 products
                d = d.reshape(r1 - r0, n_in)
            put(q, r0, r1, qb)
            scale[r0:r1] = sb
            d -= blk
            return float(np.vdot(d, d)), float(np.vdot(blk, blk))
        sums = _map(int_block, blocks)
        res = QuantResult(job.method, None if paddle_out else q, scale, None, gs, qt=q if paddle_out else None)
    err2, ref2 = sum(e for e, _ in sums), sum(r for _, r in sums)
    return res, (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0


def write(src: Source, job: Job, tmp: str, max_bytes: int, meta: dict, progress=None) -> tuple[dict, dict, int]:
    """Every tensor of `src` into `tmp` as `job` says. Returns (index, {Paddle name: relative error}, bytes read).

    One writer thread puts tensor group k on disk while group k+1 is read and quantized (pwrite drops the GIL):
    at most two groups are in memory. All StreamingWriter calls happen on that thread, in plan order.
    """
    entries = plan(src, job)
    writer = StreamingWriter(tmp, entries, max_bytes, meta)
    errors = {}
    total = sum(src.nbytes(r) for r in src.ordered_rules())
    disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ernie-quant-writer")
    try:
        with reuse_freed_memory():
            index = _write_groups(src, job, writer, disk, errors, total, progress)
    finally:
        disk.shutdown(wait=True)
        writer.release()
    return index, errors, total


def _write_groups(src: Source, job: Job, writer: StreamingWriter, disk: ThreadPoolExecutor, errors: dict, total: int,
                  progress) -> dict:
    """write()'s loop: each tensor group read, quantized or passed through, handed to the disk thread."""
    pending, done = None, 0
    for i, rule in enumerate(src.ordered_rules()):
        if rule.paddle in job.quantized:
            try:
                j = dataclasses.replace(job, group_size=rule_group(rule, job.group_size))
                if src.reader.layout == "paddle" and job.fmt == "fastdeploy" and job.gptq is None \
                        and rule.paddle != EMBEDDING:
                    res, errors[rule.paddle] = quantize_stored(*src.stored(rule), j, rule)
                else:
                    res, errors[rule.paddle] = quantize_rule(*src.linear_rows(rule), j, rule)
            except ErnieError as e:  # e.g. non-finite weights: name the tensor and its file
                n = src.names(rule)[0]
                raise CheckpointError(f"{src.files[n].path}: {rule.paddle}: {e}") from None
            ops = [(writer.write, name, np.ascontiguousarray(arr), dt)
                   for name, arr, dt in tensors_for(rule, res, job.fmt)]
        elif src.reader.layout == job.layout or rule.kind == "same":
            outs = float_outputs(src, rule, job.layout)
            ops = [(writer.copy, name, src.files[srcname], srcname)
                   for (name, _, _), srcname in zip(outs, src.names(rule))]
        else:                                               # layout conversion of a float tensor, bits moved
            arrays = [read_array(src.files[n], n) for n in src.names(rule)]
            dt = src.files[src.names(rule)[0]].dtype(src.names(rule)[0])
            w = arrays[0] if src.reader.layout == "paddle" else to_paddle(rule, arrays)
            produced = [w] if job.layout == "paddle" else to_hf(rule, w)
            ops = [(writer.write, name, arr, dt)
                   for arr, (name, _, _) in zip(produced, float_outputs(src, rule, job.layout))]
        if pending is not None:
            pending.result()                                # the previous group is on disk (or raises)
        pending = disk.submit(lambda ops=ops: [f(*args) for f, *args in ops])
        done += src.nbytes(rule)
        if progress:
            progress(done, total, i + 1)
    if pending is not None:
        pending.result()
    return writer.close()


