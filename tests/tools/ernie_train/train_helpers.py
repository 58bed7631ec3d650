"""Helpers shared by the ernie-train tests (imported by name: pytest puts this folder on sys.path)."""
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
TOKENIZER = os.path.join(ROOT, "assets", "tokenizer")


def base_args(data, out, **over):
    """CLI arguments of a tiny pretrain run; `over` maps option names to values (None drops the option)."""
    opts = {"--data": data["pt"], "--init-config": "ernie-tiny", "--tokenizer": TOKENIZER, "-o": str(out),
            "--max-steps": "6", "--logging-steps": "1", "--save-steps": "3", "--learning-rate": "3e-3",
            "--per-device-train-batch-size": "2"}
    opts.update(over)
    args = []
    for k, v in opts.items():
        if v is None:
            continue
        args += [k] if v is True else [k, str(v)]
    return args


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(out_dir, "metrics.jsonl"))]


def srun_ranks(cmd, n=2, timeout=300):
    """Start `cmd` as n ranks the way `srun` does (SLURM_* env, one loopback master port) and wait for them.
    Returns (returncodes, [(stdout, stderr) per rank])."""
    import socket
    import subprocess
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "SLURM_PROCID": str(r), "SLURM_NTASKS": str(n),
                                   "SLURM_LOCALID": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]  # a rank that disagreed would hang in a collective
    return [p.returncode for p in procs], outs
