"""The launcher mapping: paddle.distributed.launch and Slurm srun variables -> paddle's process group."""
import os
import sys

import numpy as np
import pytest

from ernie_train.dist import DistError, detect, slurm_env, tasks_per_node
from train_helpers import base_args, losses, srun_ranks


def test_detect_each_launcher():
    assert detect({}).launcher == "single"
    d = detect({"PADDLE_TRAINER_ID": "1", "PADDLE_TRAINERS_NUM": "4", "PADDLE_RANK_IN_NODE": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (1, 4, 1, "paddle")
    d = detect({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1"})
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (5, 8, 1, "slurm")
    assert detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).launcher == "single"  # srun -n1: no group


def test_slurm_tasks_per_node_syntax():
    assert tasks_per_node("2(x3),1", 4, 7) == [2, 2, 2, 1]
    assert tasks_per_node(None, 2, 8) == [4, 4]


def test_slurm_endpoints_are_laid_out_node_by_node():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "2(x2)",
           "MASTER_ADDR": "node-a", "MASTER_PORT": "29400"}
    out = slurm_env(detect(env), env)
    # no node list: with MASTER_ADDR alone every rank is on that host, one port each
    assert out["PADDLE_TRAINER_ENDPOINTS"] == "node-a:29401,node-a:29402,node-a:29403,node-a:29404"
    assert out["PADDLE_CURRENT_ENDPOINT"] == "node-a:29404" and out["PADDLE_TRAINER_ID"] == "3"
    with pytest.raises(DistError, match="export MASTER_ADDR"):
        slurm_env(detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}), {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


def test_slurm_node_list_from_scontrol(monkeypatch):
    import ernie_train.dist as dist
    monkeypatch.setattr(dist, "_hostnames", lambda env: ["gpu-01", "gpu-02"])
    env = {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "0", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_JOB_NODELIST": "gpu-[01-02]", "MASTER_PORT": "29400"}
    out = slurm_env(detect(env), env)
    assert out["MASTER_ADDR"] == "gpu-01"
    assert out["PADDLE_TRAINER_ENDPOINTS"] == "gpu-01:29401,gpu-01:29402,gpu-02:29401,gpu-02:29402"
    assert out["PADDLE_CURRENT_ENDPOINT"] == "gpu-02:29401"
    bad = {**env, "SLURM_TASKS_PER_NODE": "1(x2)"}
    with pytest.raises(DistError, match="node list gives 2 tasks"):
        slurm_env(detect(bad), bad)


@pytest.mark.slow
def test_two_emulated_srun_tasks_match_one_process(data, tmp_path):
    """Two processes started the way srun starts them (SLURM_* set, no paddle launcher) train like one."""
    from click.testing import CliRunner
    from ernie_train.cli import cli
    one = CliRunner().invoke(cli, ["pretrain", *base_args(data, tmp_path / "one", **{"--save-steps": "0"}), "-q"])
    assert one.exit_code == 0
    exe = os.path.join(os.path.dirname(sys.executable), "ernie-train")
    args = ["pretrain", *base_args(data, tmp_path / "two", **{"--save-steps": "0", "--per-device-train-batch-size": "1"}),
            "-q"]
    codes, outs = srun_ranks([exe, *args])
    assert codes == [0, 0], outs[1][1][-2000:]
    assert outs[1][0] == ""  # only rank 0 prints the summary
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-5)
