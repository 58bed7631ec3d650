"""ernie-pack command line: parse options, call ernie_pack.api, print the result. Nothing else lives here."""
from __future__ import annotations

import click

from ernie_cli import Progress, emit_json, json_option, quiet_option, run_main, seq_len_option, to_click_errors
from ernie_cli import tokenizer_option
from libernie.errors import PackError

from ernie_pack import api

EXAMPLES = {
    "pretrain": "cat docs.jsonl | ernie-pack pretrain --tokenizer assets/tokenizer --seq-len 4096 -o data/train -",
    "sft": "ernie-pack sft --tokenizer assets/tokenizer --seq-len 4096 -o data/sft chats.jsonl.gz",
    "dpo": "ernie-pack dpo --tokenizer assets/tokenizer --seq-len 4096 -o data/dpo pairs.jsonl",
}
SUMMARIES = {
    "pretrain": "Pack documents ({\"text\": ...} or ERNIEKit {\"tgt\": [...]}), each ending with EOS.",
    "sft": "Pack chats (ERNIEKit src/tgt/label or alpaca instruction/input/output/history), loss on replies.",
    "dpo": "Pack preference pairs (ERNIEKit src/tgt/response/sort or alpaca question/chosen/rejected).",
}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="ernie-tools", prog_name="ernie-pack")
def cli():
    """Tokenize JSONL once and pack it into shards that training memory-maps.

    \b
        cat docs.jsonl | ernie-pack pretrain --tokenizer assets/tokenizer --seq-len 4096 -o data/train -

    INPUT is JSONL files (.gz and .zst read transparently), or - / nothing for stdin. stdout gets one
    JSON summary; stderr gets progress. Format of the output: docs/formats/shards.md.
    """


def _pack_options(mode: str):
    """The options of one pack mode, in help order."""
    opts = [
        click.argument("inputs", nargs=-1, metavar="[INPUT]..."),
        tokenizer_option(),
        seq_len_option(),
        click.option("-o", "--output", "output", metavar="PREFIX", required=True,
                     help="Output prefix: writes PREFIX.json, PREFIX-00000.npy/.idx, ..."),
    ]
    if mode == "pretrain":
        opts += [
            click.option("--text-field", default="text", show_default=True,
                         help="JSON field holding the text (ERNIEKit {\"tgt\": [...]} is the fallback)."),
            click.option("--policy", type=click.Choice(["bfd", "concat"]), default="bfd", show_default=True,
                         help="bfd: whole documents, best-fit decreasing; concat: cut at seq_len, no padding."),
        ]
    else:
        opts.append(click.option("--overflow", type=click.Choice(["truncate", "reject"]), default="truncate",
                                 show_default=True, help="Example over --seq-len: drop oldest turns, or reject it."))
    opts += [
        click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
                     help="Tokenizing threads; the output is the same bytes for any number."),
        click.option("--shard-tokens", type=click.IntRange(min=1), default=2**28, show_default=True,
                     help="Target tokens per shard; a shard closes at the first record after it."),
        click.option("--split", metavar="TRAIN,VALID,TEST",
                     help="Split records into PREFIX-train/-valid/-test by a seeded hash, e.g. 98,1,1."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the --split hash."),
        click.option("--weights", metavar="W1,W2,...",
                     help="Interleave the inputs in these proportions (one weight per INPUT)."),
        click.option("--window", type=click.IntRange(min=1), default=1000, show_default=True,
                     help="Examples per best-fit-decreasing pass."),
        click.option("--open-bins", type=click.IntRange(min=1), default=256, show_default=True,
                     help="Partly filled sequences kept open between passes."),
        click.option("--skip-bad", is_flag=True, help="Count and skip bad records instead of stopping at the first."),
        click.option("--allow-empty", is_flag=True,
                     help="Write an empty dataset when the input has no record (default: error, nothing written)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run (same inputs and options)."),
        quiet_option(),
    ]

    def decorate(fn):
        for opt in reversed(opts):
            fn = opt(fn)
        return fn
    return decorate


def _make_pack_command(mode: str):
    @cli.command(mode, help=f"{SUMMARIES[mode]}\n\n\b\n    {EXAMPLES[mode]}\n")
    @_pack_options(mode)
    @to_click_errors
    def command(inputs, quiet, weights, **kwargs):
        try:
            parsed = [float(w) for w in weights.split(",")] if weights else None
        except ValueError:
            raise click.BadParameter(f"{weights!r} is not a list of numbers", param_hint="--weights") from None
        options = api.PackOptions(mode=mode, inputs=[i for i in inputs], weights=parsed, **kwargs)
        try:
            options.check()
        except PackError as e:
            raise click.UsageError(str(e)) from None
        with Progress(f"ernie-pack {mode}", quiet=quiet) as progress:
            summary = api.pack(options, progress=progress.update)
        emit_json(summary.to_json())
    return command


for _mode in api.MODES:
    _make_pack_command(_mode)


@cli.command("inspect")
@click.argument("prefix")
@click.option("-i", "--index", type=int, default=0, show_default=True, help="Sequence to decode.")
@click.option("--stats-only", is_flag=True, help="Print the stats only, decode nothing.")
@click.option("--verify", is_flag=True, help="Check every shard's sha256 against the manifest.")
@tokenizer_option(required=False, help="Tokenizer to decode with (default: the one recorded in the manifest).")
@json_option()
@to_click_errors
def inspect_command(prefix, index, stats_only, verify, tokenizer, as_json):
    """Print a packed dataset's stats and decode one sequence, with its loss mask, for a person to read.

    \b
        ernie-pack inspect data/train -i 0
    """
    from ernie_pack.inspect_data import render_text

    report = api.inspect(prefix, None if stats_only else index, verify, tokenizer)
    if as_json:
        emit_json(report)
    else:
        click.echo(render_text(report))


def main() -> None:
    """Console script entry point (pyproject: ernie-pack = "ernie_pack.cli:main"); `cli` is the click group."""
    run_main(cli, "ernie-pack", interrupted_hint="temp files kept; rerun with --resume to continue")
