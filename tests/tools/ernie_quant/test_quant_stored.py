"""The storage-orientation writer path (quantize_stored, Paddle-layout base -> fastdeploy) against the
row-block path it replaces there (quantize_rule over HF-orientation rows): the same bytes for every method,
group size and thread count, on shapes whose blocks do not divide evenly and with bf16 storage."""
import numpy as np
import pytest

from libernie.checkpoint.names import rules
from libernie.checkpoint.stream import widen
from libernie.config import ernie_tiny
from libernie.quant.gptq import rtn_quantize_reference

from libernie.kernels import quant_kernel

from ernie_quant import stored, stream
from ernie_quant.errors import QuantError
from ernie_quant.stream import Job, quantize_rule, quantize_stored

RULE = next(r for r in rules(ernie_tiny(vocab_size=2048)) if r.paddle.endswith("mlp.down_proj.weight"))


@pytest.fixture(params=["kernel", "numpy"])
def path(request, monkeypatch):
    """quantize_stored by the compiled kernel (many blocks) and by numpy: both must give the rule's bytes."""
    if request.param == "numpy":
        monkeypatch.setattr(quant_kernel, "load", lambda: None)
    elif quant_kernel.load() is None:
        pytest.skip("the quantization kernel is not built here (no compiler or ERNIE_QUANT_KERNEL=0)")
    monkeypatch.setattr(stored, "_KERNEL_BLOCK", 3000)                # many blocks, a ragged last one
    return request.param


def _store(n_in, n_out, seed, dtype):
    w = (np.random.default_rng(seed).standard_t(4, size=(n_in, n_out)) * 0.02).astype(np.float32)  # [in, out]
    w[:, 3] = 0.0                                                     # an all-zero output channel
    w[:, 5] = -0.0                                                    # and one of negative zeros
    if dtype == "BF16":
        return (w.view(np.uint32) >> 16).astype(np.uint16), "BF16"
    if dtype == "F16":
        return w.astype(np.float16), "F16"                            # read_array's storage dtype for F16
    return w, "F32"


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("method,group_size", [("wint8", -1), ("wint4", -1), ("wint4", 32), ("wint8", 64),
                                               ("fp8", -1)])
@pytest.mark.parametrize("storage", ["BF16", "F16", "F32"])
def test_stored_orientation_gives_the_same_bytes(monkeypatch, method, group_size, threads, storage, path):
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    monkeypatch.setattr(stored, "_BLOCK_ELEMS", 3000)                 # many blocks, a ragged last one
    monkeypatch.setattr(stored, "_BITS_BLOCK", 5000)                  # the bits pass too
    n_in, n_out = 448, 136
    store, dt = _store(n_in, n_out, len(method) + group_size, storage)
    job = Job(method, "fastdeploy", group_size, {RULE.paddle}, act_amax={"x": 1.0})
    res, err = quantize_stored(store, dt, job, RULE)
    ref, err_ref = quantize_rule(n_out, n_in, lambda r0, r1: widen(store[:, r0:r1].T, dt), job, RULE)
    np.testing.assert_array_equal(res.paddle_q(), ref.paddle_q())
    np.testing.assert_array_equal(res.scale.view(np.uint32), ref.scale.view(np.uint32))
    assert res.scale.shape == ref.scale.shape and res.paddle_q().dtype == ref.paddle_q().dtype
    assert err == pytest.approx(err_ref, rel=1e-5) and err > 0
    if method != "fp8":                                               # and both are the float64 rule itself
        q, scale = rtn_quantize_reference(widen(store, dt).T, {"wint8": 8, "wint4": 4}[method], group_size)
        np.testing.assert_array_equal(res.paddle_q(), q.T)
        np.testing.assert_array_equal(res.scale, scale)


@pytest.mark.parametrize("method,group_size", [("wint8", -1), ("wint4", 16), ("fp8", -1)])
@pytest.mark.parametrize("storage", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_stored_orientation_refuses_non_finite_weights(method, group_size, storage, bad, path):
    # the column maxima are taken on the storage bits (sign cleared): every NaN and inf pattern is above
    # every finite one, so that pass is also the finiteness check
    store, dt = _store(64, 32, 0, storage)
    one = np.array([bad], np.float32)
    store[37, 7] = {"BF16": (one.view(np.uint32) >> 16).astype(np.uint16), "F16": one.astype(np.float16),
                     "F32": one}[storage][0]
    job = Job(method, "fastdeploy", group_size, {RULE.paddle}, act_amax={})
    with pytest.raises(QuantError, match="non-finite"):
        quantize_stored(store, dt, job, RULE)


@pytest.mark.parametrize("threads", ["1", "2", "3"])
def test_block_map_keeps_every_result_in_order(monkeypatch, threads):
    # the pool takes runs of consecutive blocks; results must come back one per block, in block order
    monkeypatch.setenv("OMP_NUM_THREADS", threads)
    for n in (0, 1, 2, 7, 8, 9, 25, 101):
        assert stream._map(lambda x: (x, x * x), list(range(n))) == [(x, x * x) for x in range(n)]


@pytest.mark.parametrize("base", ["base", "base-hf"])
def test_round_to_nearest_never_imports_paddle(assets, base, tmp_path):
    # RTN streams with numpy alone: a fresh interpreter running the CLI's code path must not load paddle (300 MiB,
    # ~1 s), nor rich or sentencepiece (progress bar and tokenizer: not needed without a terminal or data)
    import subprocess
    import sys
    argv = ["ernie-quant", "wint4", "-q", "--group-size", "16", "--model", str(assets / base), "-o",
            str(tmp_path / "out")]
    code = (f"import sys\nfrom ernie_quant.cli import main\nsys.argv = {argv!r}\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "print(sorted(m for m in ('paddle', 'rich', 'sentencepiece') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "config.json").exists()


def test_mapped_tensors_equal_plain_reads_and_a_truncated_file_is_refused(assets, tmp_path):
    import shutil

    from libernie.checkpoint.safetensors_io import SafetensorsFile
    from libernie.checkpoint.stream import read_array
    from libernie.errors import CheckpointError
    path = next((assets / "base").glob("*.safetensors"))
    sf = SafetensorsFile(str(path))
    names = list(sf.names)
    for name in names:                      # offsets not page-aligned, every dtype and shape the base holds
        np.testing.assert_array_equal(stored.map_array(sf, name), read_array(sf, name))
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    sf2 = SafetensorsFile(str(copy))
    last = max(names, key=lambda n: sf2.span(n)[0])
    with open(copy, "r+b") as f:            # cut after the header was checked: mapping must not SIGBUS
        f.truncate(sf2.span(last)[0] + 1)
    with pytest.raises(CheckpointError, match="truncated"):
        stored.map_array(sf2, last)
