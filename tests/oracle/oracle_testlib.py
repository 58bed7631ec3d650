"""Shared by the parity tests: the token ids both sides run, the oracle subprocess, libernie's logits."""
import os
import subprocess

import numpy as np
import paddle

HERE = os.path.dirname(os.path.abspath(__file__))
IDS = np.array([[1, 5, 9, 22, 100, 319, 3, 7, 8, 9, 10, 11, 250, 17],
                [2, 6, 4, 3, 3, 3, 200, 201, 202, 0, 1, 2, 64, 65]], dtype=np.int64)


def run_oracle(py, *args):
    """Run tests/oracle/hf_oracle.py with the oracle venv's python; fail with its stderr tail."""
    r = subprocess.run([py, os.path.join(HERE, "hf_oracle.py"), *args], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"oracle failed:\n{r.stderr[-3000:]}"


def logits(model, ids=IDS):
    with paddle.no_grad():
        return model(paddle.to_tensor(ids)).logits.numpy()
