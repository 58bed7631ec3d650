"""quantize_stored: a Paddle-layout base's Linear weight quantized in its storage orientation [in, out], by the
compiled kernel (libernie.kernels.quant_kernel) where it is built, else by numpy; both give the same bytes."""
from __future__ import annotations

import mmap
import os

import numpy as np

from libernie.checkpoint.names import Rule
from libernie.checkpoint.safetensors_io import SafetensorsFile
from libernie.checkpoint.stream import STORAGE, tensor_span, widen
from libernie.errors import CheckpointError
from libernie.kernels import quant_kernel
from libernie.quant import BITS
from libernie.quant.formats import QuantResult, module_of
from libernie.quant.fp8 import decode_e4m3, encode_e4m3, tensor_scale

from ernie_quant.blocks import _BLOCK_ELEMS, _NON_FINITE, _map
from ernie_quant.errors import QuantError


def map_array(sf: SafetensorsFile, name: str) -> np.ndarray:
    """Tensor `name` as a read-only array over the file's pages (MAP_POPULATE: mapped in one go), unmapped when
    the array is dropped. Against a plain read into a new buffer this saves a copy of every byte and the zeroing
    of the buffer's fresh pages; resident memory is the same one tensor while it is in use."""
    offset, length = tensor_span(sf, name)
    dtype, shape = np.dtype(STORAGE[sf.dtype(name)]), sf.shape(name)
    if length == 0:
        return np.zeros(shape, dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(sf.path, "rb") as f:
        if os.fstat(f.fileno()).st_size < offset + length:     # mapped bytes past the end would kill the process
            raise CheckpointError(f"{sf.path}: truncated at tensor {name}; re-copy the file")
        mm = mmap.mmap(f.fileno(), offset + length - start, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                       prot=mmap.PROT_READ, offset=start)
    return np.frombuffer(mm, dtype, int(np.prod(shape, dtype=np.int64)), offset - start).reshape(shape)


# |x| as the storage's own bits: sign bit cleared; non-negative IEEE floats order like their bits, and every
# NaN or inf has bits >= the infinity's. So one integer max per column gives both amax and the finiteness check.
_ABS_BITS = {"BF16": (np.uint16, 0x7FFF, 0x7F80), "F16": (np.uint16, 0x7FFF, 0x7C00),
             "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000)}


def _bits_to_f32(m: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (m.astype(np.uint32) << 16).view(np.float32)
    return m.view(np.float16).astype(np.float32) if dtype == "F16" else m.view(np.float32).copy()


def _abs_bits(store: np.ndarray, dtype: str) -> np.ndarray:
    """|storage| as unsigned bits (same shape, a new array). Source.check admits only F32, F16 and BF16."""
    kind, mask, _ = _ABS_BITS[dtype]
    return store.view(kind) & kind(mask)


def _amax_bits_to_f32(m: np.ndarray, dtype: str) -> np.ndarray:
    """Maxima of _abs_bits -> float32 amax (exact); QuantError if any is NaN or inf."""
    if m.size and int(m.max()) >= _ABS_BITS[dtype][2]:
        raise QuantError(_NON_FINITE)
    return _bits_to_f32(m, dtype)


_BITS_BLOCK = 1 << 20  # elements per block of the bits pass: two cheap integer passes, so big blocks on one
                       # thread (pool hand-offs per 64K-element block cost more than the pass itself)


def _col_amax(store: np.ndarray, dtype: str) -> np.ndarray:
    """max |w| of each column of storage [in, out] as float32 [out] (exact), from the bits, without widening;
    QuantError if any element is NaN or inf."""
    n_in, n_out = store.shape
    step = max(1, _BITS_BLOCK // max(n_out, 1))
    m = _abs_bits(store[:step], dtype).max(axis=0)
    for i in range(step, n_in, step):
        np.maximum(m, _abs_bits(store[i:i + step], dtype).max(axis=0), out=m)
    return _amax_bits_to_f32(m, dtype)


def quantize_stored(store: np.ndarray, dtype: str, job: Job, rule: Rule) -> tuple[QuantResult, float]:
    """quantize_rule for a Paddle-layout base written as fastdeploy: the weight as its storage [in, out]
    (safetensors `dtype`; bf16 as uint16), quantized in that orientation in blocks of contiguous rows straight
    into QuantResult.qt (no strided reads, no transposes). Every element meets the same float32 operations with
    the same scale as in quantize_rule, so the bytes are the same.
    Per-channel RTN and fp8 take the column maxima first, from the storage bits (no widening; that pass also
    finds NaN/inf), then one widening pass that rounds and measures the error. Groups of g input rows are whole
    inside a block, so grouped RTN takes one pass."""
    from libernie.quant.gptq import group_scale, round_to_grid
    lib = quant_kernel.load()
    if lib is not None:
        return _stored_kernel(lib, np.ascontiguousarray(store), dtype, job, rule)
    n_in, n_out = store.shape
    if job.method == "fp8":
        step = max(1, _BLOCK_ELEMS // n_out)
    else:
        g = n_in if job.group_size == -1 else job.group_size
        step = g * max(1, _BLOCK_ELEMS // (n_out * g)) if g < n_in else max(1, _BLOCK_ELEMS // n_out)
    blocks = [(i, min(i + step, n_in)) for i in range(0, n_in, step)]
    rows = lambda i0, i1: widen(store[i0:i1], dtype)                            # noqa: E731

    if job.method == "fp8":
        scale = tensor_scale(float(_col_amax(store, dtype).max(initial=0)))
        codes = np.empty((n_in, n_out), np.uint8)

        def fp8_block(b):
            blk = rows(*b)
            c = codes[b[0]:b[1]]
            c[...] = encode_e4m3(blk / scale, finite=True)
            d = decode_e4m3(c)
            d *= scale
            d -= blk
            return float(np.vdot(d, d)), float(np.vdot(blk, blk))
        sums = _map(fp8_block, blocks)
        act = tensor_scale((job.act_amax or {}).get(module_of(rule), 0.0))
        res = QuantResult("fp8", None, np.array([scale], np.float32), np.array([act], np.float32), qt=codes)
    else:
        bits = BITS[job.method]
        qt, scale_t = np.empty((n_in, n_out), np.int8), np.empty((n_in // g, n_out), np.float32)
        per_channel = g == n_in
        if per_channel:                                                         # pass 1, on the bits
            scale_t[0] = group_scale(_col_amax(store, dtype), bits)

        def int_block(b):
            i0, i1 = b
            if per_channel:
                sb = scale_t[0][None]                                           # [1, out]
            else:                                                               # group maxima from the bits
                m = _abs_bits(store[i0:i1], dtype).reshape(-1, g, n_out).max(axis=1)
                sb = group_scale(_amax_bits_to_f32(m, dtype), bits)             # [k, out]
                scale_t[i0 // g:i1 // g] = sb
            blk = rows(i0, i1)
            bg = blk.reshape(-1, i1 - i0 if per_channel else g, n_out)         # [k, g', out]
            # scales are amax / qmax of these very values: |w / scale| < qmax + 1/2, so the clip cannot bind
            r = round_to_grid(bg, sb[:, None, :], bits, clip=False)             # [k, g', out] exact integers
            np.copyto(qt[i0:i1], r.reshape(i1 - i0, n_out), casting="unsafe")
            r *= sb[:, None, :]
            d = r.reshape(i1 - i0, n_out)
            d -= blk
            return float(np.vdot(d, d)), float(np.vdot(blk, blk))
        sums = _map(int_block, blocks)
        res = QuantResult(job.method, None, np.ascontiguousarray(scale_t.T), None, job.group_size, qt=qt)
    err2, ref2 = sum(e for e, _ in sums), sum(r for _, r in sums)
    return res, (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0




_KERNEL_BLOCK = 1 << 20  # elements per kernel call: one call per block, the GIL released inside


def _stored_kernel(lib, store: np.ndarray, dtype: str, job, rule: Rule) -> tuple[QuantResult, float]:
    """quantize_stored by the compiled loops: the same passes and float operations, each fused into one loop
    over a block of rows (read storage, widen, divide, round, store, error sums)."""
    from libernie.quant.gptq import group_scale
    n_in, n_out = store.shape
    g = n_in if job.method == "fp8" or job.group_size == -1 else job.group_size
    step = g * max(1, _KERNEL_BLOCK // (n_out * g)) if g < n_in else max(1, _KERNEL_BLOCK // max(n_out, 1))
    blocks = [(i, min(i + step, n_in)) for i in range(0, n_in, step)]

    def amax(maxima: np.ndarray) -> np.ndarray:        # bits -> float32, refusing NaN/inf
        return _amax_bits_to_f32(maxima, dtype)

    if g == n_in:                                      # one scale per column (or per tensor): a pass for the maxima
        parts = _map(lambda b: quant_kernel.absmax_bits(lib, store[b[0]:b[1]], dtype, b[1] - b[0])[0], blocks)
        col = amax(np.maximum.reduce(parts) if parts else np.zeros(n_out, store.dtype))
    if job.method == "fp8":
        scale = tensor_scale(float(col.max(initial=0)))
        codes = np.empty((n_in, n_out), np.uint8)
        sums = _map(lambda b: quant_kernel.fp8_encode(lib, store[b[0]:b[1]], dtype, scale, codes[b[0]:b[1]]), blocks)
        act = tensor_scale((job.act_amax or {}).get(module_of(rule), 0.0))
        res = QuantResult("fp8", None, np.array([scale], np.float32), np.array([act], np.float32), qt=codes)
    else:
        bits = BITS[job.method]
        qt, scale_t = np.empty((n_in, n_out), np.int8), np.empty((n_in // g, n_out), np.float32)
        if g == n_in:
            scale_t[0] = group_scale(col, bits)

        def int_block(b):
            i0, i1 = b
            if g == n_in:
                return quant_kernel.rtn_round(lib, store[i0:i1], dtype, n_in, scale_t, qt[i0:i1])
            sb = group_scale(amax(quant_kernel.absmax_bits(lib, store[i0:i1], dtype, g)), bits)
            scale_t[i0 // g:i1 // g] = sb
            return quant_kernel.rtn_round(lib, store[i0:i1], dtype, g, sb, qt[i0:i1])
        sums = _map(int_block, blocks)
        res = QuantResult(job.method, None, np.ascontiguousarray(scale_t.T), None, job.group_size, qt=qt)
    err2, ref2 = sum(e for e, _ in sums), sum(r for _, r in sums)
    return res, (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
