"""`ernie-pack inspect`: a dataset's stats and one sequence decoded back to text with its loss mask."""
from __future__ import annotations

import numpy as np

from libernie.data import ROLE_NAMES, FLAG_CONTINUED, PackedDataset
from libernie.errors import PackError
from libernie.tokenizer import ErnieTokenizer

OPEN, CLOSE = "\u00ab", "\u00bb"  # « » around text whose tokens carry loss


def inspect_dataset(prefix: str, index: int | None = 0, verify: bool = False, tokenizer: str | None = None) -> dict:
    """Stats of `prefix`; with `index`, that sequence decoded per segment (tokenizer from the manifest unless given).

    Returns {"prefix", "mode", "seq_len", "dtype", "sequences", "counts", "packing_efficiency", "skipped",
    "shards", "verified", "sequence"?: {"index", "length", "loss_tokens", "segments": [{"role", "start", "end",
    "continued", "continues_previous_sequence", "text", "loss_text"}]}}. continues_previous_sequence is true
    only under --policy concat, where a CONTINUED piece joins the end of sequence index-1.
    """
    ds = PackedDataset(prefix, pad=False)
    if verify:
        ds.verify()
    m = ds.manifest
    out = {"prefix": str(prefix), "mode": m.mode, "seq_len": m.seq_len, "dtype": m.dtype, "sequences": len(ds),
           "counts": m.counts, "packing_efficiency": m.packing_efficiency, "skipped": m.skipped,
           "shards": len(m.shards), "verified": verify}
    if index is None or len(ds) == 0:  # an empty dataset (ernie-pack --allow-empty): its stats say so
        return out
    if not -len(ds) <= index < len(ds):
        raise PackError(f"{ds.path}: sequence {index} out of range, the dataset has {len(ds)}; pick 0..{len(ds) - 1}")
    path = tokenizer or m.options.get("tokenizer")
    tok = ErnieTokenizer.from_pretrained(path)
    if tok.sha256 != m.tokenizer.get("sha256"):
        raise PackError(f"{path}: tokenizer sha256 differs from the one {ds.path} was packed with; "
                        "pass the right one with --tokenizer")
    sample = ds[index]
    segments = []
    concat = m.options.get("policy") == "concat"
    for start, end, flags in ds.segments(index):
        ids, mask = sample.input_ids[start:end], sample.loss_mask[start:end]
        cont = bool(flags & FLAG_CONTINUED)
        # Only --policy concat puts a piece right after the one before it (docs/formats/shards.md).
        segments.append({"role": ROLE_NAMES[flags & 3], "start": start, "end": end, "continued": cont,
                         "continues_previous_sequence": cont and concat and start == 0,
                         "text": tok.decode(ids), "loss_text": _marked(tok, ids, mask)})
    out["sequence"] = {"index": index, "length": sample.length, "loss_tokens": int(sample.loss_mask.sum()),
                       "segments": segments}
    return out


def _marked(tok, ids: np.ndarray, mask: np.ndarray) -> str:
    """Decode runs of equal mask separately and wrap the trained runs in « »."""
    if len(ids) == 0:
        return ""
    cuts = np.flatnonzero(np.diff(mask.astype(np.int8))) + 1
    parts = []
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(ids)]):
        text = tok.decode(ids[a:b])
        parts.append(OPEN + text + CLOSE if mask[a] else text)
    return "".join(parts)


def render_text(report: dict) -> str:
    """The report as plain text for a person (the CLI prints this unless --json)."""
    c = report["counts"]
    lines = [f"{report['prefix']}: {report['mode']}, seq_len {report['seq_len']}, {report['dtype']}, "
             f"{report['shards']} shard(s)",
             f"documents {c['documents']}  sequences {c['sequences']}  tokens {c['tokens']}  "
             f"loss tokens {c['loss_tokens']}  packing efficiency {report['packing_efficiency']:.4f}"]
    if report["skipped"]:
        lines.append("skipped " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
    if report["verified"]:
        lines.append("sha256 of every shard matches the manifest")
    seq = report.get("sequence")
    if seq:
        lines.append(f"\nsequence {seq['index']}: {seq['length']} tokens, {seq['loss_tokens']} with loss "
                     f"(trained text is in {OPEN} {CLOSE})")
        for k, s in enumerate(seq["segments"]):
            cont = ""
            if s["continued"]:
                cont = (", continued from the previous sequence" if s["continues_previous_sequence"] else
                        ", continued: a later piece of a longer document (bfd: pieces are not adjacent)")
            lines.append(f"--- segment {k}: {s['role']}{cont}, tokens {s['start']}..{s['end']} ---")
            lines.append(s["loss_text"])
    return "\n".join(lines)
