"""Reference log-probs for DPO, three ways, and the cache file `ernie-train dpo-ref` writes.

- cached: `compute_ref_logps` runs the reference once over the dataset and writes
  PREFIX.ref-logps.safetensors (docs/formats/dpo-ref.md); `CachedReference` looks pairs up in it.
- a frozen reference model held beside the policy: `ModelReference`.
- with LoRA, the policy itself with its adapter switched off, under no_grad: `AdapterOffReference`.
Each provider maps a DPO batch to the raw per-pair sums (chosen [P], rejected [P]) as numpy float32.
"""
from __future__ import annotations

import contextlib
import hashlib
import os

import numpy as np

from libernie.checkpoint import SafetensorsFile, write_safetensors
from libernie.data import PackedDataset
from libernie.errors import CheckpointError, ErnieError

from ernie_train.dpo import DPOError, pair_index, pair_logps

FORMAT, VERSION, SUFFIX = "ernie-dpo-ref", 1, ".safetensors"
TENSORS = {"pair_offsets": "I64", "chosen_logps": "F32", "rejected_logps": "F32", "chosen_tokens": "I32",
           "rejected_tokens": "I32"}


def ref_path(prefix: str) -> str:
    """`OUT` or `OUT.safetensors` -> the file path."""
    prefix = os.fspath(prefix)
    return prefix if prefix.endswith(SUFFIX) else prefix + SUFFIX


def default_prefix(data_prefix: str) -> str:
    """Beside the shards: data/dpo(.json) -> data/dpo.ref-logps."""
    data_prefix = os.fspath(data_prefix)
    return (data_prefix[:-5] if data_prefix.endswith(".json") else data_prefix) + ".ref-logps"


def data_sha256(ds: PackedDataset) -> str:
    """The dataset key: sha256 of one line "<npy_sha256> <idx_sha256>" per shard, in manifest order."""
    text = "".join(f"{s['npy_sha256']} {s['idx_sha256']}\n" for s in ds.manifest.shards)
    return hashlib.sha256(text.encode()).hexdigest()


def _file_sha256(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return ""


def _to_np(t) -> np.ndarray:
    return t.astype("float32").numpy()


# ---- the three providers -------------------------------------------------------------------------
class ModelReference:
    """A frozen model (its own weights) run under no_grad on the same batch."""

    def __init__(self, model):
        model.eval()
        for p in model.parameters():
            p.stop_gradient = True
        self.model = model

    def __call__(self, batch, tensors):
        import paddle
        with paddle.no_grad():
            return tuple(_to_np(x) for x in pair_logps(self.model, *tensors))


@contextlib.contextmanager
def adapter_disabled(model):
    """Every LoRALinear of `model` computes its base Linear alone (scaling 0) inside the block."""
    from libernie.lora import LoRALinear
    layers = [m for m in model.sublayers() if isinstance(m, LoRALinear)]
    saved = [m.scaling for m in layers]
    try:
        for m in layers:
            m.scaling = 0.0
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling = s


class AdapterOffReference:
    """The policy with its LoRA adapter switched off, under no_grad: the base model, no second copy."""

    def __init__(self, model):
        self.model = model

    def __call__(self, batch, tensors):
        import paddle
        with paddle.no_grad(), adapter_disabled(self.model):
            return tuple(_to_np(x) for x in pair_logps(self.model, *tensors))


class CachedReference:
    """Reference log-probs read from a dpo-ref file, checked against the dataset it is used with."""

    def __init__(self, prefix: str, ds: PackedDataset):
        self.path = path = ref_path(prefix)
        if not os.path.isfile(path):
            raise DPOError(f"{path}: not found; compute it with `ernie-train dpo-ref --data {ds.path.with_suffix('')} "
                           f"--model MODEL -o {path[:-len(SUFFIX)]}`")
        try:
            f = SafetensorsFile(path)
        except CheckpointError as e:
            raise DPOError(str(e)) from None
        meta = f.metadata
        if meta.get("format") != FORMAT:
            raise DPOError(f"{path}: not a dpo-ref file (format {meta.get('format')!r}); write it with "
                           "`ernie-train dpo-ref`")
        if int(meta.get("version", "0")) > VERSION:
            raise DPOError(f"{path}: version {meta.get('version')} is newer than this ernie-train reads ({VERSION}); "
                           "upgrade ernie-tools")
        for name, dtype in TENSORS.items():
            if name not in f.names or f.dtype(name) != dtype:
                raise DPOError(f"{path}: tensor {name} missing or not {dtype}; rerun ernie-train dpo-ref")
        want = data_sha256(ds)
        if meta.get("data_sha256") != want:
            raise DPOError(f"{path}: made for data sha256 {str(meta.get('data_sha256'))[:12]}…, but {ds.path} is "
                           f"{want[:12]}…; rerun `ernie-train dpo-ref` on these shards")
        self.offsets = np.asarray(f.get("pair_offsets"))
        pairs = int(self.offsets[-1]) if len(self.offsets) else -1
        if len(self.offsets) != len(ds) + 1 or str(pairs) != meta.get("pairs") or self.offsets[0] != 0 \
                or (np.diff(self.offsets) < 0).any():
            raise DPOError(f"{path}: {len(self.offsets) - 1} sequences / {meta.get('pairs')} pairs do not match "
                           f"{ds.path} ({len(ds)} sequences); rerun ernie-train dpo-ref")
        self.arrays = {n: np.asarray(f.get(n)) for n in TENSORS if n != "pair_offsets"}
        if any(a.shape != (pairs,) for a in self.arrays.values()):
            raise DPOError(f"{path}: per-pair tensors are not [{pairs}]; rerun ernie-train dpo-ref")
        if not (np.isfinite(self.arrays["chosen_logps"]).all() and np.isfinite(self.arrays["rejected_logps"]).all()):
            raise DPOError(f"{path}: holds non-finite log-probs; rerun ernie-train dpo-ref")
        self.meta = meta

    def __call__(self, batch, tensors):
        idx = batch.pairs
        c, r = np.empty(idx.n_pairs, np.float32), np.empty(idx.n_pairs, np.float32)
        for row, seq in enumerate(batch.indices):
            mine = np.nonzero(idx.rows == row)[0]                 # this row's pairs, in document order
            a, b = int(self.offsets[seq]), int(self.offsets[seq + 1])
            if b - a != len(mine) or (self.arrays["chosen_tokens"][a:b] != idx.chosen_tokens[mine]).any() \
                    or (self.arrays["rejected_tokens"][a:b] != idx.rejected_tokens[mine]).any():
                raise DPOError(f"{self.path}: sequence {seq} does not match the shards (pairs or token counts); "
                               "rerun ernie-train dpo-ref")
            c[mine], r[mine] = self.arrays["chosen_logps"][a:b], self.arrays["rejected_logps"][a:b]
        return c, r


# ---- dpo-ref: compute once, write the file -----------------------------------------------------
def compute_ref_logps(data: str, model_dir: str, out: str | None = None, *, adapter: str | None = None,
                      batch_size: int = 8, verify_data: bool = True, resume: bool = False, save_every: float = 60.0,
                      on_progress=None) -> dict:
    """Run the reference over every pair of `data` (a dpo dataset) and write OUT.safetensors atomically.

    Args:
        data: ernie-pack dpo prefix. model_dir: the reference checkpoint (usually the SFT model).
        out: output prefix (default PREFIX.ref-logps, beside the shards). adapter: a LoRA adapter to
        apply to model_dir. batch_size: sequences per forward. resume: continue from OUT.safetensors.partial,
        which is rewritten every `save_every` seconds. on_progress(done_sequences, tokens_this_run).
    Returns the JSON summary."""
    import time

    from libernie.model import ErnieForCausalLM
    from libernie.tokenizer import ErnieTokenizer

    from ernie_train import data as train_data
    from libernie.paths import check_writable
    t0 = time.perf_counter()
    path = ref_path(out or default_prefix(data))
    check_writable(path)                          # an unwritable output fails before the model is loaded
    ds = PackedDataset(data)
    if ds.mode != "dpo":
        raise DPOError(f"{ds.path}: packed for {ds.mode!r}, but reference log-probs need dpo shards; "
                       "pack with `ernie-pack dpo`")
    if len(ds) == 0:
        raise DPOError(f"{ds.path}: holds no sequences")
    if verify_data:
        ds.verify()
    if os.path.isfile(os.path.join(model_dir, "tokenizer.model")) and ds.tokenizer_sha256:
        if ErnieTokenizer.from_pretrained(model_dir).sha256 != ds.tokenizer_sha256:
            raise DPOError(f"{ds.path}: packed with another tokenizer than {model_dir}'s; repack with it")
    meta = {"format": FORMAT, "version": str(VERSION), "data_sha256": data_sha256(ds), "sequences": str(len(ds)),
            "seq_len": str(ds.seq_len), "model": os.fspath(model_dir),
            "model_config_sha256": _file_sha256(os.path.join(model_dir, "config.json")),
            "adapter": os.fspath(adapter) if adapter else ""}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    offsets, parts = [0], {n: [] for n in TENSORS if n != "pair_offsets"}
    if resume and os.path.isfile(partial):
        offsets, parts = _read_partial(partial, meta)
    resumed_at = len(offsets) - 1
    ref = ModelReference(ErnieForCausalLM.from_pretrained(model_dir, adapter=adapter))
    last_save, tokens = time.perf_counter(), 0
    for start in range(resumed_at, len(ds), batch_size):
        indices = list(range(start, min(len(ds), start + batch_size)))
        b = collate(ds, indices, ds.seq_len, train_data)
        c, r = ref(b, batch_tensors(b))
        if not (np.isfinite(c).all() and np.isfinite(r).all()):
            raise ErnieError(f"{model_dir}: the reference gave non-finite log-probs on {ds.path} sequences "
                             f"{indices[0]}..{indices[-1]}; check the model")
        for row in range(len(indices)):
            mine = np.nonzero(b.pairs.rows == row)[0]
            offsets.append(offsets[-1] + len(mine))
            parts["chosen_logps"].append(c[mine])
            parts["rejected_logps"].append(r[mine])
            parts["chosen_tokens"].append(b.pairs.chosen_tokens[mine])
            parts["rejected_tokens"].append(b.pairs.rejected_tokens[mine])
        tokens += int((b.doc_ids >= 0).sum())
        if on_progress:
            on_progress(indices[-1] + 1, tokens)
        if time.perf_counter() - last_save >= save_every and indices[-1] + 1 < len(ds):
            _write(partial, offsets, parts, {**meta, "partial": "true"})
            last_save = time.perf_counter()
    arrays = _write(path, offsets, parts, meta)
    if os.path.exists(partial):
        os.remove(partial)
    return {"output": path, "sequences": len(ds), "pairs": offsets[-1], "resumed_at": resumed_at,
            "data_sha256": meta["data_sha256"], "model": meta["model"], "adapter": adapter,
            "seconds": round(time.perf_counter() - t0, 3),
            "mean_chosen_logps": float(arrays["chosen_logps"].mean()),
            "mean_rejected_logps": float(arrays["rejected_logps"].mean())}


def _write(path: str, offsets: list, parts: dict, meta: dict) -> dict:
    """The tensors of the sequences done so far, written to path atomically (temp name + rename)."""
    arrays = {"pair_offsets": np.asarray(offsets, np.int64),
              **{n: (np.concatenate(v) if v else np.zeros(0)).astype(np.float32 if TENSORS[n] == "F32" else np.int32)
                 for n, v in parts.items()}}
    write_safetensors(path + ".tmp", {n: (a, TENSORS[n]) for n, a in arrays.items()},
                      {**meta, "pairs": str(offsets[-1])})
    os.replace(path + ".tmp", path)
    return arrays


def _read_partial(path: str, meta: dict) -> tuple[list, dict]:
    """(offsets, parts) from a partial file of the same data, model and adapter; else a one-line error."""
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        raise DPOError(f"{e}; delete it to start over") from None
    got = f.metadata
    for key in ("format", "data_sha256", "model_config_sha256", "adapter"):
        if got.get(key) != meta[key]:
            raise DPOError(f"{path}: written for another {key.replace('_', ' ')} ({str(got.get(key))[:16]!r}); "
                           "delete it or drop --resume to start over")
    offsets = [int(x) for x in np.asarray(f.get("pair_offsets"))]
    return offsets, {n: [np.array(f.get(n))] for n in TENSORS if n != "pair_offsets"}


def collate(ds: PackedDataset, indices: list[int], seq_len: int, train_data=None):
    """ernie_train.data.collate plus the pair index; `targets` counts pairs (the DPO loss averages over pairs)."""
    if train_data is None:
        from ernie_train import data as train_data
    b = train_data.collate(ds, indices, seq_len)
    where = f"{ds.path} sequences {indices[0]}..{indices[-1]}"
    b.pairs = pair_index(b.input_ids, b.doc_ids, b.roles, b.loss_mask, where)
    b.targets = b.pairs.n_pairs
    return b


def batch_tensors(b) -> tuple:
    """The tensors pair_logps takes, for one collated DPO batch."""
    import paddle
    sel_c, sel_r = b.pairs.selectors()
    return tuple(paddle.to_tensor(x) for x in (b.input_ids, b.position_ids, b.doc_ids, b.roles.astype(np.int32),
                                               b.pairs.src, b.pairs.tgt, sel_c, sel_r))
