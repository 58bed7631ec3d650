"""check_writable: every unusable output path is one line naming it, and nothing is left behind."""
import os

import pytest

from libernie.errors import OutputPathError
from libernie.paths import check_writable


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_creatable_paths_pass_and_create_nothing(tmp_path):
    before = _tree(tmp_path)
    check_writable(tmp_path / "new" / "deeper" / "prefix")
    check_writable(tmp_path / "outdir", is_dir=True)
    check_writable(tmp_path, is_dir=True)
    check_writable("-")
    (tmp_path / "data").mkdir()
    check_writable(tmp_path / "data", prefix=True)  # data.json, data-00000.npy go beside the directory
    (tmp_path / "data").rmdir()
    assert _tree(tmp_path) == before == []


@pytest.mark.parametrize("case", ["parent_is_file", "ancestor_is_file", "dir_wanted_file_there",
                                  "file_wanted_dir_there", "proc", "read_only_dir"])
def test_unusable_paths_are_one_line_naming_the_path(tmp_path, case):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    path, is_dir = {
        "parent_is_file": (tmp_path / "f" / "out", False),
        "ancestor_is_file": (tmp_path / "f" / "a" / "b", True),
        "dir_wanted_file_there": (tmp_path / "f", True),
        "file_wanted_dir_there": (tmp_path / "d", False),
        "proc": ("/proc/nope/x", False),                 # the case from issue 12
        "read_only_dir": (tmp_path / "ro" / "out", False),
    }[case]
    if case == "read_only_dir":
        (tmp_path / "ro").mkdir(mode=0o555)
        if os.geteuid() == 0:
            pytest.skip("root writes into a mode 555 directory; /proc covers a directory that refuses files")
    before = _tree(tmp_path)
    with pytest.raises(OutputPathError) as e:
        check_writable(path, is_dir=is_dir)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and "\n" not in msg
    assert _tree(tmp_path) == before
