"""ernie-quant command line: parse options, call ernie_quant.api.quantize, print its summary. Nothing else here."""
from __future__ import annotations

import sys
import time

import click

from ernie_cli import emit_json, max_shard_size_option, quiet_option, run_main, to_click_errors, tokenizer_option

from ernie_quant import api

EXAMPLE = "ernie-quant wint8 --model models/ernie-0.3b -o models/ernie-0.3b-wint8"


class StageProgress:
    """Stage, done/total and rate on stderr: a rich bar per stage on a terminal, plain lines otherwise."""

    UNITS = {"write": "B", "calibrate": "seqs", "eval": "seqs"}

    def __init__(self, quiet: bool, every: float = 10.0):
        self.quiet, self.every = quiet, every
        self.tty = sys.stderr.isatty()
        self.last = 0.0
        self._bar, self._tasks, self._start = None, {}, {}

    def __enter__(self):
        if not self.quiet and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
            self._bar = Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 console=Console(stderr=True))
            self._bar.start()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet:
            return
        self._start.setdefault(stage, time.perf_counter())
        if self._bar is not None:
            if stage not in self._tasks:
                self._tasks[stage] = self._bar.add_task(f"ernie-quant {stage}", total=total)
            self._bar.update(self._tasks[stage], completed=done, total=total)
        elif done >= total or time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            dt = max(time.perf_counter() - self._start[stage], 1e-9)
            if stage == "write":
                msg = f"{done / 1e6:,.1f} of {total / 1e6:,.1f} MB  {done / dt / 1e6:,.1f} MB/s"
            else:
                msg = f"{done} of {total} sequences"
            sys.stderr.write(f"ernie-quant {stage}: {msg}\n")
            sys.stderr.flush()

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.stop()


def _group(ctx, param, value):
    if value is None:
        return None
    if value != -1 and value < 2:
        raise click.BadParameter("must be -1 (one group per output channel) or >= 2")
    return value


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.argument("method", metavar="{wint8|wint4|fp8}")
@click.option("--model", "model", metavar="DIR", required=True, help="Float model directory (HF or Paddle layout).")
@click.option("-o", "--output", "out", metavar="OUTDIR", required=True, help="Directory to write.")
@click.option("--calib", metavar="PREFIX", help="ernie-pack dataset for calibration (needed by fp8 and --algo gptq).")
@click.option("--algo", type=click.Choice(api.ALGOS), default="rtn", show_default=True,
              help="Integer rounding: round to nearest (streaming) or GPTQ (layer by layer on --calib).")
@click.option("--group-size", type=int, default=None, callback=_group, metavar="N",
              help="Input columns per scale (wint8/wint4); -1 = per output channel. Default: wint8 -1, wint4 128.")
@click.option("--skip", multiple=True, metavar="PATTERN",
              help="Keep Linears matching this pattern (Paddle module names, e.g. 'ernie.layers.0.*', "
                   "'*.down_proj') in float. Repeatable. Embeddings and lm_head stay float unless "
                   "--quantize-embeddings; norms always do.")
@click.option("--quantize-embeddings", is_flag=True,
              help="Also quantize the token embedding and an untied lm_head (wint8 only): int8, one scale per "
                   "vocabulary row. Off by default.")
@click.option("--format", "fmt", type=click.Choice(["fastdeploy", "compressed-tensors"]), default="fastdeploy",
              show_default=True, help="fastdeploy: Paddle layout, FastDeploy names; compressed-tensors: HF layout "
                                      "that transformers (and vLLM) read.")
@click.option("--eval", "eval_prefix", metavar="PREFIX",
              help="Held-out ernie-pack dataset: report perplexity of the base and the quantized model.")
@tokenizer_option(required=False, help="Tokenizer the shards must match (default: the model directory's).")
@click.option("--calib-samples", type=click.IntRange(min=1), default=128, show_default=True,
              help="Calibration sequences.")
@click.option("--eval-samples", type=click.IntRange(min=1), default=64, show_default=True,
              help="Evaluation sequences.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, metavar="N",
              help="Cut calibration and evaluation sequences to N tokens (default: as packed).")
@max_shard_size_option()
@click.option("--force", is_flag=True, help="Replace OUTDIR if it exists.")
@quiet_option()
@click.version_option(package_name="ernie-tools", prog_name="ernie-quant")
@to_click_errors
def cli(method, model, out, calib, algo, group_size, skip, quantize_embeddings, fmt, eval_prefix, tokenizer,
        calib_samples, eval_samples, seq_len, max_shard_size, force, quiet):
    """Quantize an ERNIE 4.5 checkpoint after training: wint8, wint4 (RTN or GPTQ) or tensor-wise fp8.

    \b
        ernie-quant wint8 --model models/ernie-0.3b -o models/ernie-0.3b-wint8
        ernie-quant fp8 --model models/ernie-0.3b --calib data/valid -o models/ernie-0.3b-fp8 --eval data/test
        ernie-quant wint4 --algo gptq --calib data/train --model models/ernie-0.3b -o out/w4 \\
            --format compressed-tensors

    Round to nearest and fp8 weights stream one tensor at a time (memory about one tensor, any model size).
    OUTDIR loads in ernie-serve and ErnieForCausalLM.from_pretrained; --format compressed-tensors also in
    transformers (the format vLLM reads too). stdout gets one JSON summary; stderr gets progress.
    """
    if method not in api.METHODS:
        raise click.UsageError(f"unknown method {method!r}; use one of {', '.join(api.METHODS)}")
    with StageProgress(quiet) as progress:
        summary = api.quantize(method, model, out, calib=calib, algo=algo, group_size=group_size, skip=skip,
                               fmt=fmt, eval_prefix=eval_prefix, tokenizer=tokenizer, calib_samples=calib_samples,
                               eval_samples=eval_samples, seq_len=seq_len, max_shard_size=max_shard_size,
                               force=force, quantize_embeddings=quantize_embeddings, progress=progress)
    emit_json(summary.to_json())


def main() -> None:
    """Console script entry point (pyproject: ernie-quant = "ernie_quant.cli:main")."""
    run_main(cli, "ernie-quant", interrupted_hint="nothing was written to OUTDIR (a hidden temp directory was removed)")
