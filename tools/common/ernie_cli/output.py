"""The stream contract: JSON on stdout, progress on stderr, errors as one line, clean exits."""
from __future__ import annotations

import functools
import os
import signal
import sys
import time

import click
import orjson

from libernie.errors import ErnieError


def emit_json(obj) -> None:
    """Write one JSON object and a newline to stdout (the tool's data channel) and flush it.

    Strict JSON: orjson writes NaN and +-inf (Python or numpy) as null, never the bare NaN token."""
    sys.stdout.buffer.write(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")
    sys.stdout.flush()


def to_click_errors(fn):
    """Decorator for command callbacks: an ErnieError becomes `Error: <message>` and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ErnieError as e:
            raise click.ClickException(str(e)) from None
    return wrapper


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (Slurm preemption, kill) unwinds like Ctrl-C, so cleanup code runs


def run_main(group: click.Command, name: str, interrupted_hint: str = "") -> None:
    """Run a click command as a program: the usual exit codes, SIGTERM as Ctrl-C, quiet exit on a closed pipe."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        group.main(prog_name=name, standalone_mode=False)
    except click.exceptions.Abort:  # click turns Ctrl-C inside prompts/callbacks into Abort
        _interrupted(name, interrupted_hint)
    except KeyboardInterrupt:
        _interrupted(name, interrupted_hint)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # The reader went away (`| head`). Point stdout at devnull so the interpreter's final flush is silent.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # what a shell reports for a process killed by SIGPIPE


def _interrupted(name: str, hint: str) -> None:
    click.echo(f"Error: {name} interrupted" + (f"; {hint}" if hint else ""), err=True)
    sys.exit(130)


class Progress:
    """Documents and tokens done, with rates, on stderr.

    Args:
        label: what is running (e.g. "ernie-pack sft").
        quiet: print nothing.
        every: seconds between plain lines when stderr is not a terminal (default 10).
        unit: what the first counter counts (default "docs"; ernie-train counts "steps").
    """

    def __init__(self, label: str, quiet: bool = False, every: float = 10.0, unit: str = "docs"):
        self.label, self.quiet, self.every, self.unit = label, quiet, every, unit
        self.tty = sys.stderr.isatty()
        self.start = self.last = time.perf_counter()
        self.docs = self.tokens = 0
        self._bar = None

    def __enter__(self) -> "Progress":
        if self.quiet or not self.tty:
            return self
        from rich.console import Console
        from rich.progress import Progress as Bar, SpinnerColumn, TextColumn, TimeElapsedColumn
        self._bar = Bar(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.fields[stats]}"),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self._bar.start()
        self._task = self._bar.add_task(self.label, stats="")
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.update(self._task, stats=self._stats())
            self._bar.stop()
        elif not self.quiet and exc_type is None:
            self._line("done")

    def update(self, docs: int, tokens: int) -> None:
        """Record totals so far; draws the bar, or prints a plain line at most every `every` seconds."""
        self.docs, self.tokens = docs, tokens
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.update(self._task, stats=self._stats())
        elif time.perf_counter() - self.last >= self.every:
            self.last = time.perf_counter()
            self._line("")

    def _stats(self) -> str:
        dt = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.docs:,} {self.unit}  {self.tokens:,} tokens  {self.docs / dt:,.1f} {self.unit}/s  "
                f"{self.tokens / dt:,.0f} tokens/s")

    def _line(self, tail: str) -> None:
        sys.stderr.write(f"{self.label}: {self._stats()}{'  ' + tail if tail else ''}\n")
        sys.stderr.flush()
