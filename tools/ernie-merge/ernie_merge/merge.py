"""The ernie-merge API: `merge(base, adapter, out, ...) -> MergeSummary`.

Streams the base one tensor group at a time (a Paddle tensor and its HF parts: q/k/v, gate/up), in the order the
base's shards hold them, read with plain reads. A tensor the adapter touches goes out in row blocks: widened to
fp32, given its rows of `scaling * A @ B`, cast back, written straight into output shards planned up front
(libernie.checkpoint.stream). Untouched tensors are copied file to file when the layout keeps their orientation.
Peak memory is about one tensor (group) plus the adapter, whatever the model's size. No click, no printing:
progress goes through a callback.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from libernie.checkpoint import FORMAT_TAG, LAYOUTS, dtype_tag
from libernie.checkpoint.names import FUSED_LINEAR, LINEAR, SAME, Rule, ignorable, rules, to_hf, to_paddle
from libernie.checkpoint.safetensors_io import SafetensorsFile
from libernie.checkpoint.sharded import CheckpointReader, atomic_dir, parse_size
from libernie.checkpoint.stream import Entry, StreamingWriter, read_array, tensor_span, widen
from libernie.config import ErnieConfig
from libernie.checkpoint.side_files import copy_side_files
from libernie.errors import CheckpointError
from libernie.memory import peak_rss_mb
from libernie.paths import check_writable

from ernie_merge.adapters import EMBED, TIED_HEAD, Adapter, read_adapter
from ernie_merge.files import sha_warning, version

TOOL = "ernie-merge"
_ROWS = 4096   # rows per `W[rows] += s * A[rows] @ B` when a whole tensor is fixed at once: bounds the temporary


@dataclass
class MergeSummary:
    base: str
    adapter: str | None
    adapter_format: str | None
    out: str
    layout: str
    base_layout: str
    dtype: str
    tensors: int                 # tensors written
    tensors_merged: int          # base tensors the adapter changed (deltas or replacements)
    untied: bool                 # a tied base got its own lm_head because the adapter touched embed/head
    scaling: list[float]
    shards: int
    bytes: int                   # tensor bytes written
    seconds: float
    gb_per_s: float
    peak_rss_mb: float           # VmHWM of this process after the merge (before --verify)
    side_files: list[str]
    warnings: list[str] = field(default_factory=list)
    verify: dict | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class _Group:
    rule: Rule                               # output rule
    parts: list[tuple[SafetensorsFile, str]]  # base tensors, in base-layout order
    source: str                              # "paddle", "hf" (base layout) or "tied_head" (E read as lm_head)


def merge(base, adapter=None, out=None, layout: str | None = None, dtype: str = "keep",
          max_shard_size="5GB", verify: bool = False, force: bool = False,
          progress: Callable[[int, int, int], None] | None = None) -> MergeSummary:
    """Fold LoRA adapter `adapter` (any format; None: convert only) into checkpoint `base`, write `out`.

    Args:
        base: base model directory (either layout, sharded or single file).
        adapter: adapter directory: ernie-tools, PaddleFormers/ERNIEKit or PEFT; None converts only.
        out: output directory; written under a temp name and renamed into place.
        layout: "hf" or "paddle" for the output; None keeps the base's.
        dtype: "keep" (each tensor keeps its dtype), "bf16" or "fp32".
        max_shard_size: output shard budget ("5GB", "500MB", or bytes).
        verify: afterwards, compare logits of the merged model with base + adapter (builds both models).
        force: replace an existing `out`.
        progress: called after each tensor group as progress(bytes_done, bytes_total, groups_done).
    Raises CheckpointError / LoRAError / ConfigError with a one-line message naming the file.
    """
    t0 = time.perf_counter()
    base, out = os.fspath(base), os.fspath(out)
    if layout not in (None, *LAYOUTS):
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dtype_tag(dtype)  # ValueError for a bad dtype before any work
    max_bytes = parse_size(max_shard_size)
    if os.path.abspath(out) == os.path.abspath(base):
        raise CheckpointError(f"{out}: is the base model directory; write the merged model somewhere else")
    if os.path.exists(out) and not force:
        raise CheckpointError(f"{out}: already exists; choose another path or pass --force")
    check_writable(out, is_dir=True)  # before any input is read
    try:
        plan = make_plan(base, adapter, layout, dtype)
        total = sum(e.nbytes for e in plan.entries)
        side, index, shards = _write(plan, base, out, force, max_bytes, total, progress)
    except OSError as e:  # disk full, permissions, a file vanishing under us: one line, not a traceback
        raise CheckpointError(f"{e.filename or out}: {e.strerror or e}; check the path, its permissions and "
                              "the free space") from None
    ad, reader = plan.adapter, plan.reader
    warnings = sha_warning(ad, base) if ad else []
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    summary = MergeSummary(
        base=base, adapter=os.fspath(adapter) if adapter else None, adapter_format=ad.kind if ad else None,
        out=out, layout=plan.layout, base_layout=reader.layout, dtype=dtype, tensors=len(index["weight_map"]),
        tensors_merged=len(plan.mods), untied=plan.untie, scaling=ad.scalings() if ad else [],
        shards=shards, bytes=total, seconds=round(seconds, 3),
        gb_per_s=round(total / max(seconds, 1e-9) / 1e9, 3), peak_rss_mb=round(rss, 1),
        side_files=side, warnings=warnings + (ad.warnings if ad else []))
    if verify:
        from ernie_merge.verify import verify_merge
        summary.verify = verify_merge(base, ad, out)
    return summary


def _write(plan: "Plan", base: str, out: str, force: bool, max_bytes: int, total: int, progress):
    """Side files, every tensor group, config.json into a temp directory renamed to `out` at the end.
    Returns (side files copied, index, number of shards)."""
    with atomic_dir(out, overwrite=force) as tmp:
        side = copy_side_files(base, tmp)
        writer = StreamingWriter(tmp, plan.entries, max_bytes, plan.meta)
        try:
            done = 0
            for i, g in enumerate(plan.groups):
                _write_group(writer, g, plan.layout, plan.target, plan.mods.get(g.rule.paddle))
                done += group_bytes(g, plan)
                if progress:
                    progress(done, total, i + 1)
            index = writer.close()
        finally:
            writer.release()
        plan.out_cfg.save(tmp, plan.layout)
    return side, index, len(writer.files)


# ---- planning ----------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Everything a merge writes, decided before the first byte (so each tensor has its place in the output)."""
    cfg: ErnieConfig
    reader: CheckpointReader
    adapter: Adapter | None
    layout: str                  # output layout
    target: str | None           # output dtype tag, None = keep
    untie: bool
    out_cfg: ErnieConfig
    groups: list                 # [_Group], in base shard order
    entries: list                # [Entry], the output tensors in plan order
    mods: dict                   # Paddle name -> (replacements, deltas)
    meta: dict                   # safetensors metadata of every output shard


def make_plan(base: str, adapter, layout: str | None, dtype: str) -> Plan:
    cfg = ErnieConfig.from_file(base)
    reader = CheckpointReader(base)
    files = _open_files(reader)
    _check_base(reader, files, cfg)
    ad = read_adapter(adapter, cfg) if adapter is not None else None
    out_layout, target = layout or reader.layout, dtype_tag(dtype)
    untie = bool(ad) and cfg.tie_word_embeddings and bool(ad.targets() & {EMBED, TIED_HEAD})
    out_cfg = dataclasses.replace(cfg, tie_word_embeddings=False) if untie else cfg
    groups = _groups(out_cfg, reader, files, untie)
    entries = [Entry(n, dt, s) for g in groups for n, dt, s in _outputs(g, out_layout, target)]
    meta = {"format": FORMAT_TAG[out_layout], "ernie_tools": "merge", "merge_tool": f"{TOOL} {version()}",
            "merge_base": os.path.abspath(base), "merge_adapter": os.path.abspath(adapter) if adapter else "",
            "merge_adapter_format": ad.kind if ad else "", "merge_scaling": json.dumps(ad.scalings() if ad else [])}
    return Plan(cfg, reader, ad, out_layout, target, untie, out_cfg, groups, entries, _by_target(ad), meta)


def group_bytes(g: _Group, plan: Plan) -> int:
    return sum(Entry(n, dt, s).nbytes for n, dt, s in _outputs(g, plan.layout, plan.target))



def _open_files(reader: CheckpointReader) -> dict[str, SafetensorsFile]:
    """{tensor name: its shard}, one SafetensorsFile per shard (headers only; data is read with plain reads)."""
    by_path: dict[str, SafetensorsFile] = {}
    out = {}
    for name in reader.keys():
        path = reader.file_of(name)
        if path not in by_path:
            by_path[path] = SafetensorsFile(path)
        out[name] = by_path[path]
    return out


def _check_base(reader: CheckpointReader, files, cfg: ErnieConfig) -> None:
    """Names and shapes from the headers only (no data read): the base must be what config.json describes."""
    table = rules(cfg)
    names_of = (lambda r: [r.paddle]) if reader.layout == "paddle" else (lambda r: list(r.hf))
    shapes_of = (lambda r: [r.paddle_shape]) if reader.layout == "paddle" else (lambda r: r.hf_shapes())
    known = {n for r in table for n in names_of(r)}
    extra = sorted(n for n in reader.keys() if n not in known and not ignorable(n, cfg))
    if extra:
        raise CheckpointError(f"{reader.path}: {len(extra)} tensor(s) config.json does not describe, first "
                              f"{extra[0]}; check num_hidden_layers, use_bias and tie_word_embeddings")
    for r in table:
        for name, shape in zip(names_of(r), shapes_of(r)):
            if name not in files:
                raise CheckpointError(f"{reader.path}: missing tensor {name}; the checkpoint is incomplete")
            if files[name].shape(name) != tuple(shape):
                raise CheckpointError(f"{files[name].path}: tensor {name} has shape {list(files[name].shape(name))}, "
                                      f"config.json implies {list(shape)}; config and weights disagree")


def _groups(out_cfg: ErnieConfig, reader: CheckpointReader, files, untie: bool) -> list[_Group]:
    """One group per output rule, ordered as the base's shards hold them (shard, then offset)."""
    shard_no = {f: i for i, f in enumerate(sorted(set(reader.weight_map.values())))}
    groups, keys = [], []
    for r in rules(out_cfg):
        if untie and r.paddle == TIED_HEAD:
            src = EMBED if reader.layout == "paddle" else "model.embed_tokens.weight"
            groups.append(_Group(r, [(files[src], src)], "tied_head"))
            keys.append((len(shard_no), 0))  # last, as writers put the head
            continue
        names = [r.paddle] if reader.layout == "paddle" else list(r.hf)
        groups.append(_Group(r, [(files[n], n) for n in names], reader.layout))
        first = names[0]
        keys.append((shard_no[reader.weight_map[first]], tensor_span(files[first], first)[0]))
    order = sorted(range(len(groups)), key=lambda i: keys[i])
    return [groups[i] for i in order]


def _part_dtypes(g: _Group) -> list[str]:
    return [sf.dtype(n) for sf, n in g.parts]


def _outputs(g: _Group, layout: str, target: str | None) -> list[tuple[str, str, tuple]]:
    """(name, dtype, shape) of the tensors group `g` writes, in order."""
    dts = _part_dtypes(g)
    same_layout = g.source == layout
    if len(set(dts)) > 1 and not same_layout:
        raise CheckpointError(f"{g.parts[0][0].path}: parts of {g.rule.paddle} have different dtypes {dts}; "
                              "cannot fuse them")
    if layout == "paddle":
        names, shapes, dts = [g.rule.paddle], [g.rule.paddle_shape], dts[:1]
    else:
        names, shapes = list(g.rule.hf), g.rule.hf_shapes()
        dts = dts if same_layout else dts[:1] * len(names)
    return [(n, _float_target(dt, target), tuple(s)) for n, dt, s in zip(names, dts, shapes)]


def _float_target(dt: str, target: str | None) -> str:
    return target if target and dt in ("F32", "F16", "BF16", "F64") else dt


def _by_target(ad: Adapter | None) -> dict[str, tuple[list, list]]:
    mods: dict[str, tuple[list, list]] = {}
    if ad:
        for r in ad.replacements:
            mods.setdefault(r.target, ([], []))[0].append(r)
        for d in ad.deltas:
            mods.setdefault(d.target, ([], []))[1].append(d)
    return mods


# ---- one group ----------------------------------------------------------------------------------------
def _write_group(writer: StreamingWriter, g: _Group, layout: str, target: str | None, mods) -> None:
    outs = _outputs(g, layout, target)
    dts = _part_dtypes(g)
    # Embeddings and norms (SAME) are stored alike in both layouts; only their names change.
    keeps_orientation = (g.source == layout or (g.source == "tied_head" and layout == "hf")
                         or (g.rule.kind == SAME and g.source != "tied_head"))
    if keeps_orientation:
        # The common case: each base part is one output tensor in the same orientation. Stream it in row
        # blocks: widen, add this block's share of the delta, cast back, write. Untouched parts are copied.
        for k, ((sf, src), (name, dt, _)) in enumerate(zip(g.parts, outs)):
            if mods is None and dts[k] == dt:
                writer.copy(name, sf, src)
                continue
            fix = None if mods is None else _part_fixer(g, k, *mods)
            writer.write(name, read_array(sf, src), dts[k], fix=fix)
        return
    # Layout conversion: the whole group in Paddle orientation, then split / transpose for the output.
    arrays = [read_array(sf, n) for sf, n in g.parts]
    if mods is None:
        w, dt = _to_paddle(g, arrays), dts[0]
    else:
        w, dt = _to_paddle(g, [widen(a, d) for a, d in zip(arrays, dts)]), "F32"
        del arrays
        _part_fixer(g, None, *mods)(w, 0)
    produced = [w] if layout == "paddle" else to_hf(g.rule, w)
    for arr, (name, _, _) in zip(produced, outs):
        writer.write(name, arr, dt)  # casts to the planned dtype block by block


def _to_paddle(g: _Group, arrays: list[np.ndarray]) -> np.ndarray:
    """The group's tensor in Paddle orientation (a view when only a transpose is needed)."""
    if g.source == "paddle":
        return arrays[0]
    if g.source == "tied_head":
        return arrays[0].T  # lm_head [h, V] = E^T
    return to_paddle(g.rule, arrays)


def _part_fixer(g: _Group, k: int | None, replacements, deltas):
    """fix(block, first_row) applying the replacements and deltas that fall on part k of group g, in place.

    k None: the block is the whole tensor in Paddle orientation. Otherwise part k as the base stores it: Paddle
    orientation ([in, out], source "paddle"), or HF ([out, in], transposed, for Linear weights of an HF base and
    for a tied head read from the embedding). Part k holds Paddle columns [lo, lo + width)."""
    rule = g.rule
    if k is None or g.source == "paddle":
        lo, width, transposed = 0, rule.paddle_shape[-1], False
    else:
        widths = rule.split or (rule.paddle_shape[-1],)
        lo, width = sum(widths[:k]), widths[k]
        transposed = g.source == "tied_head" or rule.kind in (LINEAR, FUSED_LINEAR)

    # Per delta, once: the scaling folded into B, and (for [out, in] parts) both factors transposed and contiguous,
    # so each block's share is one BLAS call writing a contiguous [rows, in] result.
    if transposed:
        prepared = [(d.offset, d.b.shape[1], np.ascontiguousarray((np.float32(d.scaling) * d.b).T),
                     np.ascontiguousarray(d.a.T)) for d in deltas]
    else:
        prepared = [(d.offset, d.b.shape[1], d.a, np.float32(d.scaling) * d.b) for d in deltas]

    def fix(block: np.ndarray, r0: int) -> None:
        n = block.shape[0]
        # the Paddle columns this block covers: all of the part's, or (transposed) its rows r0..r0+n
        c0, c1 = (lo + r0, lo + r0 + n) if transposed else (lo, lo + width)
        for r in replacements:
            a, b = max(c0, r.offset), min(c1, r.offset + r.value.shape[-1])
            if a >= b:
                continue
            val = r.value[..., a - r.offset:b - r.offset]
            if transposed:
                block[a - c0:b - c0] = val.T
            else:
                block[..., a - c0:b - c0] = val[r0:r0 + n] if val.ndim == 2 else val
        for off, width_d, left, right in prepared:
            a, b = max(c0, off), min(c1, off + width_d)
            if a >= b:
                continue
            if transposed:   # W_hf[out, in] rows a..b += (s * B[:, a..b])^T @ A^T
                block[a - c0:b - c0] += left[a - off:b - off] @ right
            else:            # W[in, out] rows, columns a..b += A[rows] @ (s * B[:, a..b])
                for i in range(0, n, _ROWS):
                    block[i:i + _ROWS, a - c0:b - c0] += left[r0 + i:r0 + i + _ROWS] @ right[:, a - off:b - off]
    return fix
