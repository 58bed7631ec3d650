"""ernie-merge command line: parse options, call ernie_merge.merge.merge, print its summary. Nothing else lives here."""
from __future__ import annotations

import sys
import time

import click

from ernie_cli import emit_json, max_shard_size_option, quiet_option, run_main, to_click_errors

from ernie_merge import merge as api

EXAMPLE = "ernie-merge --base models/ernie-0.3b --adapter runs/sft-lora/adapter -o models/ernie-0.3b-sft"


class ByteProgress:
    """Bytes and tensors written, on stderr: a rich bar on a terminal, a plain line every `every` s otherwise."""

    def __init__(self, label: str, quiet: bool, every: float = 10.0):
        self.label, self.quiet, self.every = label, quiet, every
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.done = self.total = self.tensors = 0
        self._bar = None

    def __enter__(self):
        if not self.quiet and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TimeElapsedColumn, TransferSpeedColumn
            self._bar = Progress("{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True))
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int, tensors: int) -> None:
        self.done, self.total, self.tensors = done, total, tensors
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)
        elif not self.quiet and time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self._line("")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif not self.quiet and exc_type is None:
            self._line("done")

    def _line(self, tail: str) -> None:
        dt = max(time.perf_counter() - self.start, 1e-9)
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        sys.stderr.write(f"{self.label}: {self.tensors:,} tensor groups  {self.done / 1e6:,.1f} MB{pct}  "
                         f"{self.done / dt / 1e6:,.1f} MB/s{'  ' + tail if tail else ''}\n")
        sys.stderr.flush()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--base", "base", metavar="DIR", required=True, help="Base model directory (HF or Paddle layout).")
@click.option("--adapter", "adapter", metavar="DIR",
              help="LoRA adapter: ernie-train, ERNIEKit/PaddleFormers (lora_config.json) or PEFT "
                   "(adapter_config.json). Without it the base is only converted (--layout, --dtype).")
@click.option("-o", "--output", "out", metavar="OUTDIR", required=True, help="Directory to write.")
@click.option("--layout", type=click.Choice(["hf", "paddle"]), default=None,
              help="Output layout: hf (transformers, vLLM) or paddle (PaddleFormers, FastDeploy). Default: the base's.")
@click.option("--dtype", type=click.Choice(["keep", "bf16", "fp32"]), default="keep", show_default=True,
              help="Output dtype; keep: every tensor keeps the base's dtype (the merge itself runs in fp32).")
@max_shard_size_option()
@click.option("--verify", is_flag=True,
              help="Compare the merged model's logits with base + adapter on a few sequences (builds both models).")
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists.")
@quiet_option()
@click.version_option(package_name="ernie-tools", prog_name="ernie-merge")
@to_click_errors
def cli(base, adapter, out, layout, dtype, max_shard_size, verify, force, quiet):
    """Fold a LoRA adapter into a base model's safetensors shards, one tensor at a time.

    \b
        ernie-merge --base models/ernie-0.3b --adapter runs/sft-lora/adapter -o models/ernie-0.3b-sft

    Works in fp32 (W += scaling * A @ B), casts back, and never holds more than one tensor group, so it merges a
    300B model on a small machine. Carries tokenizer, chat template and generation config along; a tied model whose
    embedding or head the adapter touched is written untied. stdout gets one JSON summary; stderr gets progress.
    """
    with ByteProgress("ernie-merge", quiet) as progress:
        summary = api.merge(base, adapter, out, layout=layout, dtype=dtype, max_shard_size=max_shard_size,
                            verify=verify, force=force, progress=progress)
    for w in summary.warnings:
        if not quiet:
            click.echo(f"Warning: {w}", err=True)
    emit_json(summary.to_json())


def main() -> None:
    """Console script entry point (pyproject: ernie-merge = "ernie_merge.cli:main")."""
    run_main(cli, "ernie-merge", interrupted_hint="nothing was written to OUTDIR (a hidden temp directory was removed)")
