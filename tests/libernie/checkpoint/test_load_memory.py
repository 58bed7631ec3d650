"""Loading copies each tensor out of its mapped file without keeping the checkpoint resident."""
import numpy as np
import paddle

import libernie.checkpoint as ckpt
from libernie.checkpoint.safetensors_io import SafetensorsFile, drop_pages, write_safetensors


def _rss_file_pages(path: str) -> int:
    """Resident kB of `path`'s mappings in this process (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            inside = line.rstrip().endswith(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_release_drops_pages_and_keeps_values(tmp_path):
    path = str(tmp_path / "t.safetensors")
    a = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)  # 2 MB
    write_safetensors(path, {"a": (a, "F32"), "b": (a[:3].copy(), "F32")})
    f = SafetensorsFile(path)
    assert float(f.get("a").sum()) == float(a.sum())           # touch every page
    assert _rss_file_pages(path) >= 2000
    f.release("a")
    assert _rss_file_pages(path) < 100
    np.testing.assert_array_equal(f.get("a"), a)                # pages fault back in from the file
    np.testing.assert_array_equal(f.get("b"), a[:3])


def test_drop_pages_ignores_anonymous_memory():
    a = np.arange(1 << 20, dtype=np.float32)
    drop_pages(a[: 1 << 19])                                     # would zero it if it were madvised
    np.testing.assert_array_equal(a, np.arange(1 << 20, dtype=np.float32))


def test_block_copy_equals_set_value(monkeypatch, tmp_path):
    path = str(tmp_path / "e.safetensors")
    e = np.random.default_rng(1).standard_normal((1000, 64)).astype(np.float32)
    write_safetensors(path, {"e": (e, "F32")})
    monkeypatch.setattr(ckpt, "_BLOCK", 7 * 64 * 4 + 5)         # 7 rows a block, a ragged last block
    p = paddle.create_parameter([1000, 64], "float32")
    ckpt._copy_into(p, SafetensorsFile(path).get("e"), "F32")
    np.testing.assert_array_equal(p.numpy(), e)
    assert not p.stop_gradient
    q = paddle.create_parameter([4, 3], "float32")               # bf16 storage widened exactly
    bits = (np.arange(12, dtype=np.float32).reshape(4, 3).view(np.uint32) >> 16).astype(np.uint16)
    ckpt._copy_into(q, bits, "BF16")
    np.testing.assert_array_equal(q.numpy(), np.arange(12, dtype=np.float32).reshape(4, 3))
