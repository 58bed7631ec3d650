"""ernie-pack: JSONL -> tokenized, packed .npy/.idx shards for pretrain, SFT and DPO. API in ernie_pack.api."""
__version__ = "0.1.0"
