"""Where this process sits in a data-parallel job: one process, `paddle.distributed.launch`, or Slurm `srun`.

paddle.distributed.launch sets PADDLE_TRAINER_ID / PADDLE_TRAINERS_NUM / endpoints itself. Under srun
we translate SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID, with the master address from MASTER_ADDR or
the first host of `scontrol show hostnames $SLURM_JOB_NODELIST`, into the same variables, then let
paddle.distributed.init_parallel_env() build the process group (gloo on CPU, NCCL on GPU).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from libernie.errors import ErnieError


class DistError(ErnieError):
    """The launcher's environment does not describe a usable process group."""


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"   # single | paddle | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(env=os.environ) -> DistInfo:
    """Read the launcher's variables without touching paddle (so tests can check the mapping)."""
    if "PADDLE_TRAINER_ID" in env and int(env.get("PADDLE_TRAINERS_NUM", "1")) > 1:
        return DistInfo(int(env["PADDLE_TRAINER_ID"]), int(env["PADDLE_TRAINERS_NUM"]),
                        int(env.get("PADDLE_RANK_IN_NODE", env.get("PADDLE_LOCAL_RANK", "0"))), "paddle")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistInfo(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                        "slurm")
    return DistInfo()


def _hostnames(env) -> list[str]:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        if env.get("MASTER_ADDR"):
            return []
        raise DistError(f"scontrol show hostnames {nodelist} failed ({e}); export MASTER_ADDR") from None
    return out


def tasks_per_node(spec: str | None, nodes: int, world: int) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE ("2(x3),1" -> [2, 2, 2, 1]); without it, an even split."""
    if not spec:
        return [world // max(nodes, 1)] * max(nodes, 1)
    out = []
    for part in spec.split(","):
        if "(x" in part:
            n, rep = part.rstrip(")").split("(x")
            out += [int(n)] * int(rep)
        else:
            out.append(int(part))
    return out


def slurm_env(info: DistInfo, env=os.environ) -> dict[str, str]:
    """The PADDLE_* / MASTER_* variables init_parallel_env needs, derived from Slurm's. Ranks are laid out
    node by node (Slurm's default block distribution); rank r listens on MASTER_PORT + 1 + local rank."""
    hosts = _hostnames(env)
    addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
    if not addr:
        raise DistError("under srun but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set; export MASTER_ADDR")
    port = int(env.get("MASTER_PORT", "29500"))
    if hosts:
        counts = tasks_per_node(env.get("SLURM_TASKS_PER_NODE"), len(hosts), info.world_size)
    else:  # no node list (an emulated or single-node launch): every rank on MASTER_ADDR
        hosts, counts = [addr], [info.world_size]
    endpoints = [f"{h}:{port + 1 + i}" for h, k in zip(hosts, counts) for i in range(k)]
    if len(endpoints) != info.world_size:
        raise DistError(f"SLURM_NTASKS={info.world_size} but the node list gives {len(endpoints)} tasks; "
                        "check --ntasks-per-node")
    return {"PADDLE_TRAINER_ID": str(info.rank), "PADDLE_TRAINERS_NUM": str(info.world_size),
            "PADDLE_RANK_IN_NODE": str(info.local_rank), "MASTER_ADDR": addr, "MASTER_PORT": str(port),
            "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints), "PADDLE_CURRENT_ENDPOINT": endpoints[info.rank],
            "FLAGS_selected_gpus": str(info.local_rank)}


def init(env=os.environ) -> DistInfo:
    """Detect the launcher and, with more than one process, initialise paddle's default process group."""
    info = detect(env)
    if info.world_size == 1:
        return info
    import paddle
    import paddle.distributed as dist

    if info.launcher == "slurm":
        for k, v in slurm_env(info, env).items():
            os.environ.setdefault(k, v)
    if not paddle.device.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        os.environ.setdefault("PADDLE_DISTRI_BACKEND", "gloo")
    dist.init_parallel_env()
    return info


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few scalars over all ranks (token counts, loss sums). Identity with one process."""
    if info.world_size == 1:
        return values
    import paddle
    import paddle.distributed as dist
    t = paddle.to_tensor(values, dtype="float64")
    dist.all_reduce(t)
    return t.numpy().tolist()
