"""GPTQ over a whole ErnieForCausalLM, one decoder layer at a time, with bounded memory.

Order, as in the reference GPTQ implementation's "true sequential" mode: run the embeddings once over the
calibration batches; then for each decoder layer, for each of its linears in the order the forward calls
them (qkv_proj, o_proj, up_gate_proj, down_proj), collect that linear's inputs with a forward pre-hook,
quantize it and write the dequantized weight back in place before the next linear's inputs are collected;
finally run the layer to turn its inputs into the next layer's. Every linear is thus calibrated on the
activations of the model quantized so far, exactly as the quantized model will see them.

The fused qkv_proj and up_gate_proj are quantized once each, as the fused [out, in] weight: their output
channels (rows) are the q/k/v (gate/up) channels, and groups run along input columns, so splitting the
rows into HF's separate q/k/v or gate/up keeps every (q, scale) row intact.

Memory: the calibration hidden states of ONE layer boundary (calibration tokens x hidden floats, each
batch's output replaces its input as the layer runs), the token ids, one Hessian at a time (in² float64),
and one layer's forward on one batch. Never the whole model's activations. Collecting a linear's inputs
stops the layer's forward at that linear, so a layer costs about 3 forwards over the
calibration set (its attention half runs four times, its MLP half twice), not 5.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import paddle
import paddle.nn as nn

from libernie.errors import ErnieError
from libernie.quant.gptq import HessianAccumulator, QuantArgError, check_args, dequantize, gptq_quantize


class CalibrationError(ErnieError):
    """The calibration batches cannot calibrate the model: none given, malformed, or a linear they never reach."""


@dataclass
class LinearReport:
    """What gptq_model did to one linear (passed to `on_linear` as each finishes)."""

    name: str                 # Paddle parameter name, e.g. "ernie.layers.0.self_attn.qkv_proj.weight"
    layer: int                # decoder layer index; num_hidden_layers for lm_head
    shape: tuple[int, int]    # [out, in]
    tokens: int               # calibration rows (non-padding tokens) in its Hessian
    rel_error: float          # tr(E H Eᵀ) / tr(W H Wᵀ), E = W - dequant: relative calibration output error
    seconds: float
    held_hidden_bytes: int    # calibration hidden states held at the time: one layer boundary
    held_hessian_bytes: int   # Hessians held at the time: this linear's only


@dataclass
class _Batch:
    input_ids: paddle.Tensor                 # int64 [b, s]
    position_ids: paddle.Tensor | None       # int64 [b, s]
    doc_ids: paddle.Tensor | None            # int64 [b, s], -1 on padding
    roles: paddle.Tensor | None
    real: np.ndarray | None                  # bool [b*s]: rows that count (doc_ids >= 0), None = all


class _Stop(Exception):
    """Raised by a pre-hook once it has the input it came for: the rest of the layer need not run."""


def gptq_model(model, batches: Iterable[dict], *, bits: int, group_size: int,
               skip: Callable[[str], bool] = lambda name: False, damp: float = 0.01, block: int = 128,
               act_order: bool = False, on_linear: Callable[[LinearReport], None] | None = None
               ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Quantize every linear of `model` (an ErnieForCausalLM) with GPTQ, in place.

    batches: dicts with paddle or numpy int64 [b, s] `input_ids` and optionally `position_ids`, `doc_ids`
        (-1 marks padding: it runs through the model but is left out of every Hessian) and `roles`.
    bits, group_size: the convention of libernie.quant.gptq (8 or 4; group_size -1 = per output channel).
    skip(param_name) -> True leaves that linear untouched and out of the result.
    damp, block, act_order: passed to gptq_quantize.
    Linears are those of the decoder layers plus an untied lm_head (as "lm_head.weight"); embeddings
    and norms are never quantized.
    Returns {paddle_param_name: (q int8 [out, in], scale float32 [out, n_groups])}; the model's weights
    become dequant(q, scale) (transposed to Paddle's [in, out]).
    """
    ernie = model.ernie
    _check_shapes(model, bits, group_size, skip)                              # fail now, not at the last layer
    calib = [_batch(b, i) for i, b in enumerate(batches)]
    if not calib:
        raise CalibrationError("no calibration batches: the calibration dataset is empty; pack some sequences")
    names = {id(sub): name for name, sub in model.named_sublayers()}
    kw = dict(bits=bits, group_size=group_size, damp=damp, block=block, act_order=act_order)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    was_training = model.training
    model.eval()
    try:
        with paddle.no_grad():
            hidden = [ernie.embed_tokens(b.input_ids) for b in calib]          # layer boundary 0: [b, s, h] each
            for li, layer in enumerate(ernie.layers):
                run = _layer_runner(ernie, layer)
                for lin in _linears_in_call_order(layer, run, hidden[0], calib[0]):
                    name = names[id(lin)] + ".weight"
                    if skip(name):
                        continue
                    acc = _collect(lin, run, hidden, calib, name)
                    out[name] = _quantize(lin, acc, name, li, hidden, on_linear, kw)
                for i, b in enumerate(calib):                                  # boundary li -> li + 1, in place
                    hidden[i] = run(hidden[i], b)
            head = getattr(model, "lm_head", None)                             # untied only
            if head is not None and not skip("lm_head.weight"):
                acc = HessianAccumulator(head.weight.shape[0])
                for i, b in enumerate(calib):
                    hidden[i] = ernie.norm(hidden[i])
                    acc.add(_rows(hidden[i], b))
                out["lm_head.weight"] = _quantize(head, acc, "lm_head.weight", len(ernie.layers), hidden,
                                                  on_linear, kw)
    finally:
        if was_training:
            model.train()
    return out


def dataset_batches(ds, n_sequences: int, batch_size: int) -> Iterator[dict]:
    """The first n_sequences of a PackedDataset (ernie-pack shards) as gptq_model batches: int64 [b, s]
    input_ids, position_ids, doc_ids (-1 on padding) and roles, built like ernie-train's collate."""
    if not ds.pad:
        raise CalibrationError(f"{ds.path}: open the calibration dataset with pad=True (rows must stack)")
    n = min(n_sequences, len(ds))
    for a in range(0, n, batch_size):
        samples = [ds[i] for i in range(a, min(a + batch_size, n))]
        yield {key: np.stack([getattr(s, key) for s in samples]).astype(np.int64)
               for key in ("input_ids", "position_ids", "doc_ids", "roles")}


def _check_shapes(model, bits: int, group_size: int, skip) -> None:
    """QuantArgError naming the first linear the convention cannot quantize (bits, group size)."""
    for name, sub in model.named_sublayers():
        if isinstance(sub, nn.Linear) and not skip(name + ".weight"):
            n_in, out = sub.weight.shape                                       # Paddle weight is [in, out]
            try:
                check_args((out, n_in), bits, group_size)
            except QuantArgError as e:
                raise QuantArgError(f"{name}.weight: {e}") from None


def _batch(b: dict, i: int) -> _Batch:
    if "input_ids" not in b:
        raise CalibrationError(f"calibration batch {i} has no input_ids")

    def t(key):
        v = b.get(key)
        if v is None:
            return None
        v = v if isinstance(v, paddle.Tensor) else paddle.to_tensor(np.asarray(v))
        return v.astype("int64")

    ids, doc = t("input_ids"), t("doc_ids")
    if ids.ndim != 2:
        raise CalibrationError(f"calibration batch {i}: input_ids must be [b, s], got {list(ids.shape)}")
    real = None if doc is None else (doc.numpy() >= 0).reshape(-1)
    return _Batch(ids, t("position_ids"), doc, t("roles"), real)


def _layer_runner(ernie, layer):
    """(hidden [b, s, h], batch) -> layer output, with the rope and mask ErnieModel.forward would build.
    They are rebuilt per call rather than kept: a mask is [b, 1, s, s], rope 2 x [b, s, nh, hd]."""
    def run(x, b: _Batch):
        bs, s = b.input_ids.shape
        rope, mask = ernie.rope_and_mask(bs, s, b.position_ids, b.doc_ids, None, 0, b.roles)
        return layer(x, rope, mask)
    return run


def _linears_in_call_order(layer, run, x, b: _Batch) -> list[nn.Linear]:
    """The layer's nn.Linear sublayers in the order one forward calls them (found with pre-hooks)."""
    order: list[nn.Linear] = []

    def seen(lin, _inputs):
        if all(lin is not o for o in order):
            order.append(lin)

    handles = [sub.register_forward_pre_hook(seen) for sub in layer.sublayers() if isinstance(sub, nn.Linear)]
    try:
        run(x, b)
    finally:
        for h in handles:
            h.remove()
    return order


def _rows(x: paddle.Tensor, b: _Batch) -> np.ndarray:
    """[b, s, in] activations -> float [n_real, in]: the non-padding tokens. An MoE expert's input is
    already [rows, in] (the tokens routed to it, in dispatch order): all its rows are kept, since the
    padding mask does not follow the dispatch (pretrain calibration shards are packed without padding)."""
    rows = x.astype("float32").numpy().reshape(-1, x.shape[-1])
    return rows if b.real is None or x.ndim == 2 else rows[b.real]


def _collect(lin: nn.Linear, run, hidden, calib, name: str) -> HessianAccumulator:
    """Run the layer over every batch up to `lin` and accumulate the Hessian of its inputs."""
    acc = HessianAccumulator(lin.weight.shape[0])                              # Paddle weight is [in, out]
    current: list[_Batch] = []

    def hook(_lin, inputs):
        acc.add(_rows(inputs[0], current[0]))
        raise _Stop

    handle = lin.register_forward_pre_hook(hook)
    try:
        for x, b in zip(hidden, calib):
            current[:] = [b]
            try:
                run(x, b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if acc.n == 0:
        raise CalibrationError(f"no calibration token reached {name}; give more calibration data or skip it")
    return acc


def _quantize(lin: nn.Linear, acc: HessianAccumulator, name: str, li: int, hidden, on_linear, kw):
    start = time.perf_counter()
    w = lin.weight.astype("float32").numpy().T                                 # [out, in]
    q, scale = gptq_quantize(w, acc.H, **kw)
    deq = dequantize(q, scale, kw["group_size"])                               # [out, in] float32
    lin.weight.set_value(paddle.to_tensor(np.ascontiguousarray(deq.T)).astype(lin.weight.dtype))
    if on_linear is not None:
        H32, e = acc.H.astype(np.float32), w - deq                            # a report: float32 is plenty
        num, den = np.sum((e @ H32) * e, dtype=np.float64), np.sum((w @ H32) * w, dtype=np.float64)
        rel = float(num / max(den, 1e-30))
        held = sum(int(np.prod(x.shape)) * x.element_size() for x in hidden)
        on_linear(LinearReport(name, li, (w.shape[0], w.shape[1]), acc.n, rel, time.perf_counter() - start,
                               held, acc.H.nbytes))
    return q, scale
