"""Options that repeat across tools, declared once so they are spelled and behave the same everywhere."""
import click


def tokenizer_option(required: bool = True, help: str | None = None):
    """--tokenizer PATH: a directory holding tokenizer.model, or the .model file itself."""
    return click.option("--tokenizer", "tokenizer", metavar="PATH", required=required,
                        help=help or "Tokenizer: a directory with tokenizer.model, or the .model file.")


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
