"""ernie-train CLI: options map one-to-one onto TrainConfig fields; --config FILE.yaml underneath."""
from __future__ import annotations

import sys

import click
from click.core import ParameterSource
from ernie_cli import Progress, emit_json, quiet_option, run_main, to_click_errors

from ernie_train.config import FIELDS, load_yaml, resolve

EXAMPLE = """\b
Examples:
  ernie-train pretrain --data data/train --init-config ernie-tiny --tokenizer assets/tokenizer -o runs/pt --max-steps 200
  ernie-train sft --data data/sft --model runs/pt/checkpoint-00000200 --lora -o runs/sft --max-steps 100
  python -m paddle.distributed.launch --nproc_per_node 2 $(which ernie-train) pretrain --config train.yaml
  srun ernie-train pretrain --config train.yaml     # see scripts/slurm/
"""

_HELP = {
    "data": "ernie-pack output prefix (PREFIX.json) to train on.",
    "eval_data": "ernie-pack prefix of held-out data: loss and perplexity every --eval-steps.",
    "model": "Start from this checkpoint directory (either layout).",
    "init_config": "Start from scratch: a preset (ernie-tiny, ernie-small, ernie-4.5-0.3b) or a config.json.",
    "tokenizer": "Tokenizer: a directory with tokenizer.model, or any .model file (needed with --init-config; "
                 "default: the model's).",
    "output_dir": "Where checkpoints, metrics.jsonl and train_config.json go.",
    "lora": "Train a LoRA adapter instead of the full model.",
    "recompute": "Recompute activations per decoder layer in backward (less memory, ~30% more compute).",
    "resume": "Continue from the latest complete checkpoint in OUTDIR.",
    "verify_data": "Check every shard's sha256 against its manifest before training.",
    "skip_nan_inf_steps": "Skip (no update) up to N steps whose loss or gradient norm is NaN/inf; 0 (default): "
                          "stop at the first, naming the last good checkpoint.",
    "lora_plus_scale": "LoRA+: learning-rate multiplier of the B matrices.",
    "peak_tflops": "Peak TFLOP/s of one device, for the MFU estimate in metrics.jsonl.",
}


def _options(fn):
    """One click option per TrainConfig field (except mode), in kebab case."""
    for name, f in reversed(list(FIELDS.items())):
        if name == "mode":
            continue
        flag = "--" + name.replace("_", "-")
        kind = f.type.split("|")[0].strip()
        help_text = _HELP.get(name, f"Default: {f.default!r}.")
        if kind == "bool":
            decl = [f"{flag}/--no-{name.replace('_', '-')}"]
            fn = click.option(*decl, name, default=f.default, show_default=True, help=help_text)(fn)
        else:
            decl = [flag] + (["-o"] if name == "output_dir" else [])
            typ = {"int": int, "float": float}.get(kind, str)
            fn = click.option(*decl, name, type=typ, default=f.default, help=help_text,
                              metavar=kind.upper())(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                      help="YAML file with the same options as snake_case keys; flags override it.")(fn)
    return quiet_option()(fn)


def _command(mode: str):
    @click.command(mode, help=f"{'Pretrain' if mode == 'pretrain' else 'Supervised fine-tune'} on ernie-pack "
                              f"{mode} shards.\n\n" + EXAMPLE)
    @_options
    @click.pass_context
    @to_click_errors
    def cmd(ctx, config_file, quiet, **kwargs):
        explicit = {k: v for k, v in kwargs.items()
                    if ctx.get_parameter_source(k) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)}
        cfg = resolve(mode, load_yaml(config_file) if config_file else {}, explicit)
        from ernie_train.trainer import train  # paddle loads only when a run starts, not for --help
        with Progress(f"ernie-train {mode}", quiet=quiet, unit="steps") as progress:
            def on_log(rec):
                progress.label = (f"ernie-train {mode} {rec['step']}/{cfg.max_steps} loss {rec['loss']:.4f} "
                                  f"lr {rec['lr']:.2e}")
                progress.update(rec["step"], rec["tokens_seen"])
            summary = train(cfg, on_log=on_log)
        if summary.get("world_size", 1) == 1 or _rank() == 0:
            emit_json(summary)
    return cmd


def _rank() -> int:
    import os
    return int(os.environ.get("PADDLE_TRAINER_ID", os.environ.get("SLURM_PROCID", "0")))


@click.group(help="Pretrain and fine-tune ERNIE 4.5 (full or LoRA) on ernie-pack shards.\n\n" + EXAMPLE)
@click.version_option(package_name="ernie-tools")
def cli():
    pass


cli.add_command(_command("pretrain"))
cli.add_command(_command("sft"))


def main():
    run_main(cli, "ernie-train", interrupted_hint="rerun with --resume to continue from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
