"""libernie.checkpoint.stream, which ernie-merge writes through: golden bytes against the safetensors library,
the planned order is enforced, and the block-wise casts give the same bits as their slow twins."""
import numpy as np
import pytest

from libernie.checkpoint.safetensors_io import from_float32, to_float32
from libernie.checkpoint.stream import Entry, StreamingWriter, narrow, widen


def test_streaming_writer_files_match_the_safetensors_library(tmp_path):
    """Golden bytes: our planned-header writer produces the same file as safetensors' own serializer."""
    from safetensors.numpy import save_file
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = from_float32(np.linspace(-2, 2, 6, dtype=np.float32).reshape(2, 3), "BF16")
    w = StreamingWriter(str(tmp_path), [Entry("a", "F32", (3, 4)), Entry("b", "F32", (2, 3))], 1 << 20)
    w.write("b", b, "BF16")  # any order: every tensor has its planned place; widened on the way out
    w.write("a", a, "F32")
    w.close()
    save_file({"a": a, "b": (b.astype(np.uint32) << 16).view(np.float32)}, str(tmp_path / "ref.safetensors"))
    assert (tmp_path / "model-00001-of-00001.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    (tmp_path / "x").mkdir()
    w = StreamingWriter(str(tmp_path / "x"), [Entry("a", "F32", (3, 4)), Entry("c", "F32", (1,))], 10)
    with pytest.raises(RuntimeError, match="b is not planned"):
        w.write("b", a, "F32")
    w.write("a", a, "F32")
    with pytest.raises(RuntimeError, match="a is not planned or was already written"):
        w.write("a", a, "F32")
    with pytest.raises(RuntimeError, match="1 planned tensors never written, first c"):
        w.close()


def test_blockwise_casts_match_their_slow_twins():
    """stream.widen/narrow (in place, cache-sized) give the same bits as safetensors_io.to_float32/from_float32."""
    rng = np.random.default_rng(0)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1.00390625, 1.01171875, -1.00390625, 3.4e38, 1e-40,
                        -1e-45, 65504.0], np.float32)
    x = np.concatenate([special, rng.standard_normal(4096) * 10.0 ** rng.integers(-30, 30, 4096)])
    x = x.astype(np.float32).reshape(-1, 4)
    np.testing.assert_array_equal(narrow(x.copy(), "BF16"), from_float32(x, "BF16"))
    bits = from_float32(x, "BF16")
    np.testing.assert_array_equal(widen(bits, "BF16").view(np.uint32), to_float32(bits, "BF16").view(np.uint32))
    with np.errstate(over="ignore"):  # fp16 overflows to inf, in both
        np.testing.assert_array_equal(narrow(x.copy(), "F16"), from_float32(x, "F16"))


def test_copy_without_copy_file_range_gives_the_same_bytes(tmp_path, monkeypatch):
    from merge_testlib import make_base

    from ernie_merge.merge import merge
    make_base(tmp_path / "base", tied=True, layout="hf", shard="20KB")
    merge(tmp_path / "base", None, tmp_path / "kernel", max_shard_size="30KB")

    def unsupported(*args):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr("os.copy_file_range", unsupported)
    merge(tmp_path / "base", None, tmp_path / "plain", max_shard_size="30KB")
    files = sorted(p.name for p in (tmp_path / "kernel").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "plain").iterdir()) and len(files) > 3
    for name in files:
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes(), name
