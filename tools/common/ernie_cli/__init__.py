"""Shared CLI plumbing for every ernie-* tool: the options they all spell the same way, and the stream contract.

- stdout carries data only: one JSON summary (`emit_json`) or a JSONL stream.
- stderr carries progress (`Progress`): rich on a terminal, plain lines otherwise, nothing with --quiet.
- `run_main` turns libernie errors into `Error: ...` + exit 1, usage errors exit 2, Ctrl-C/SIGTERM exit 130,
  and a closed stdout (`| head`) ends quietly.
"""
from ernie_cli.options import json_option, max_shard_size_option, quiet_option, seq_len_option, tokenizer_option
from ernie_cli.output import Progress, emit_json, run_main, to_click_errors

__all__ = ["json_option", "max_shard_size_option", "quiet_option", "seq_len_option", "tokenizer_option", "Progress", "emit_json",
           "run_main", "to_click_errors"]
