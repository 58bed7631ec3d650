"""Output paths checked before any work: `check_writable(path)` fails in one line, having written nothing.

Every tool calls it on each output path first, so a typo such as `-o /proc/nope/x` is reported at once
rather than after hours of tokenizing or training. The test is a real one: a probe file is created and
removed in the nearest existing ancestor (os.access says yes to root even on read-only mounts and /proc).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from libernie.errors import OutputPathError


def check_writable(path, *, is_dir: bool = False, prefix: bool = False) -> Path:
    """Raise OutputPathError unless `path` can be created (with any missing parents) and written.

    Args:
        path: an output file, a directory (is_dir=True), or a file prefix (prefix=True) such as ernie-pack's
            `out/train`, whose files (out/train.json, out/train-00000.npy) go next to it. "-" (stdout) passes.
        is_dir: the tool writes a directory at `path` (created if missing).
        prefix: `path` only names files beside it, so it may also be an existing directory's name.
    Returns the path (expanded). Creates nothing that stays: the probe file is removed at once.
    """
    if str(path) == "-":
        return Path("-")
    p = Path(os.path.expanduser(str(path)))
    if p.exists() or p.is_symlink():
        if is_dir and not p.is_dir():
            raise OutputPathError(f"{path}: exists and is not a directory; choose another output directory")
        if not is_dir and not prefix and p.is_dir():
            raise OutputPathError(f"{path}: is a directory; pass a file path (or prefix) inside it")
    holder = p if is_dir else p.parent                 # the directory the output lives in
    ancestor = holder
    while not (ancestor.exists() or ancestor.is_symlink()) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"{path}: cannot be created: {ancestor} is not a directory; "
                              "choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ernie-write-check-", dir=ancestor)
    except OSError as e:
        what = "write in" if ancestor == holder else f"create {holder} under"
        raise OutputPathError(f"{path}: cannot {what} {ancestor} ({e.strerror}); choose another output "
                              "path") from None
    os.close(fd)
    os.unlink(probe)
    return p
