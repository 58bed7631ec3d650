"""Packed training data: JSONL records -> tokenized items -> packed sequences -> shards, and back.

Spec of the files: docs/formats/shards.md. No click, rich or printing here; errors are typed
(libernie.errors.DataError, ShardFormatError, PackError).
"""
from libernie.data.dataset import PackedDataset, PackedSample, attention_mask
from libernie.data.manifest import Manifest, manifest_path
from libernie.data.packing import BestFitPacker, ConcatPacker, Item, Sequence, build, cut_document, document
from libernie.data.shard import (FLAG_CONTINUED, ROLE_CHOSEN, ROLE_DOC, ROLE_PROMPT, ROLE_REJECTED, ShardIndex,
                                 ShardInfo, ShardWriter, token_dtype)
from libernie.data.writer import DatasetWriter, shard_base

ROLE_NAMES = {ROLE_DOC: "doc", ROLE_PROMPT: "prompt", ROLE_CHOSEN: "chosen", ROLE_REJECTED: "rejected"}

__all__ = [
    "PackedDataset", "PackedSample", "attention_mask", "Manifest", "manifest_path", "BestFitPacker",
    "ConcatPacker", "Item", "Sequence", "build", "cut_document", "document", "FLAG_CONTINUED", "ROLE_CHOSEN",
    "ROLE_DOC", "ROLE_PROMPT", "ROLE_REJECTED", "ROLE_NAMES", "ShardIndex", "ShardInfo", "ShardWriter",
    "token_dtype", "DatasetWriter", "shard_base",
]
