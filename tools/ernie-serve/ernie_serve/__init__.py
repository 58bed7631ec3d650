"""ernie-serve: an OpenAI-compatible server for ERNIE 4.5 checkpoints, with continuous batching (engine.py)."""
