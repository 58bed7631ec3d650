"""Options that repeat across tools, declared once so they are spelled and behave the same everywhere."""
import click


def tokenizer_option(required: bool = True, help: str | None = None):
    """--tokenizer PATH: a directory holding tokenizer.model, or a .model file of any name.

    The value is passed on as given; tools load it with `ErnieTokenizer.from_pretrained(PATH)`, which
    applies libernie's one rule, `libernie.tokenizer.resolve_tokenizer_file` (and its one-line errors).
    It is not checked while parsing: usage errors (exit 2) must not be hidden behind a missing file (exit 1).
    """
    return click.option("--tokenizer", "tokenizer", metavar="PATH", required=required,
                        help=help or "Tokenizer: a directory with tokenizer.model, or any .model file.")


def seq_len_option(required: bool = True, default: int | None = None, help: str | None = None):
    """--seq-len N: tokens per training sequence."""
    return click.option("--seq-len", "seq_len", type=click.IntRange(min=2), metavar="N", required=required,
                        default=default, help=help or "Tokens per sequence.")


def quiet_option():
    """--quiet / -q: no progress or log lines on stderr (errors are still printed)."""
    return click.option("-q", "--quiet", is_flag=True, help="Print no progress on stderr; errors still show.")


def json_option():
    """--json: print the result as one JSON object on stdout instead of text for people."""
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout instead of text.")


def max_shard_size_option():
    """--max-shard-size SIZE: the output shard budget (5GB, 500MB, 2GiB), checked while parsing (exit 2)."""
    def check(ctx, param, value):
        from libernie.checkpoint import parse_size
        try:
            parse_size(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return value
    return click.option("--max-shard-size", default="5GB", show_default=True, callback=check,
                        help="Output shard budget, e.g. 5GB, 500MB, 2GiB.")
