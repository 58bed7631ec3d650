"""ernie-train CLI: options map one-to-one onto TrainConfig fields; --config FILE.yaml underneath."""
from __future__ import annotations

import sys

import click
from click.core import ParameterSource
from ernie_cli import Progress, emit_json, quiet_option, run_main, to_click_errors

from ernie_train.config import DPO_FIELDS, FIELDS, load_yaml, resolve

EXAMPLE = """\b
Examples:
  ernie-train pretrain --data data/train --init-config ernie-tiny --tokenizer assets/tokenizer -o runs/pt --max-steps 200
  ernie-train sft --data data/sft --model runs/pt/checkpoint-00000200 --lora -o runs/sft --max-steps 100
  ernie-train dpo-ref --data data/dpo --model runs/sft-merged        # writes data/dpo.ref-logps.safetensors
  ernie-train dpo --data data/dpo --model runs/sft-merged --lora --ref-logps data/dpo.ref-logps -o runs/dpo
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
    "moe_aux_loss_lambda": "MoE: weight of the load-balancing loss (default: the model config's, 1e-5).",
    "moe_z_loss_lambda": "MoE: weight of the router z-loss (default: the model config's, 0 = off).",
    "moe_aux_free_coef": "MoE with moe_use_aux_free: correction-bias step after each optimizer step "
                         "(overloaded experts down); 0 = off; not applied with --lora.",
    "resume": "Continue from the latest complete checkpoint in OUTDIR.",
    "verify_data": "Check every shard's sha256 against its manifest before training.",
    "skip_nan_inf_steps": "Skip (no update) up to N steps whose loss or gradient norm is NaN/inf; 0 (default): "
                          "stop at the first, naming the last good checkpoint.",
    "lora_plus_scale": "LoRA+: learning-rate multiplier of the B matrices.",
    "peak_tflops": "Peak TFLOP/s of one device, for the MFU estimate in metrics.jsonl.",
    "loss_type": "sigmoid (DPO), ipo, hinge, simpo, orpo or dpop; formulas in the README.",
    "beta": "Inverse temperature of the implicit reward (orpo: weight of the odds-ratio term).",
    "label_smoothing": "cDPO: assumed probability that a preference is flipped (sigmoid, simpo).",
    "simpo_gamma": "SimPO's target reward margin.",
    "dpop_lambda": "DPO-Positive: weight of max(0, ref_chosen - policy_chosen).",
    "sft_loss_ratio": "Add this times the chosen response's per-token NLL.",
    "pref_loss_ratio": "Multiply the preference loss by this.",
    "normalize_logps": "Rescale each response's log-prob sum to the pair's mean response length (ERNIEKit).",
    "offset_alpha": "ERNIEKit's score offset; needs score deltas ernie-pack does not keep (must be 0).",
    "reference_free": "No reference model (only for the reference-free simpo and orpo).",
    "ref_logps": "Cached reference log-probs from `ernie-train dpo-ref` (no second model in memory).",
    "ref_model": "A frozen reference model directory (default: the starting model; with --lora, adapter off).",
    "eval_ref_logps": "Cached reference log-probs of --eval-data (default: beside it, with --ref-logps).",
}
_TITLES = {"pretrain": "Pretrain", "sft": "Supervised fine-tune", "dpo": "Preference-tune (DPO and variants)"}


def _options(mode: str):
    return lambda fn: _add_options(fn, mode)


def _add_options(fn, mode: str):
    """One click option per TrainConfig field (except mode; DPO's only on dpo), in kebab case."""
    for name, f in reversed(list(FIELDS.items())):
        if name == "mode" or (mode != "dpo" and name in DPO_FIELDS):
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
    @click.command(mode, help=f"{_TITLES[mode]} on ernie-pack {mode} shards.\n\n" + EXAMPLE)
    @_options(mode)
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


@click.group(help="Pretrain, fine-tune and preference-tune ERNIE 4.5 (full or LoRA) on ernie-pack shards.\n\n"
             + EXAMPLE)
@click.version_option(package_name="ernie-tools")
def cli():
    pass


cli.add_command(_command("pretrain"))
cli.add_command(_command("sft"))
cli.add_command(_command("dpo"))


@cli.command("dpo-ref", help="Compute the reference log-probs of every DPO pair once, for `dpo --ref-logps`.\n\n"
             "\b\nExample:\n  ernie-train dpo-ref --data data/dpo --model runs/sft-merged"
             "   # -> data/dpo.ref-logps.safetensors\n\nFormat: docs/formats/dpo-ref.md.")
@click.option("--data", required=True, metavar="PREFIX", help="ernie-pack dpo prefix.")
@click.option("--model", "model_dir", required=True, metavar="DIR", help="Reference model (usually the SFT model).")
@click.option("--adapter", default=None, metavar="DIR", help="LoRA adapter to apply to --model for the reference.")
@click.option("-o", "--output", default=None, metavar="OUT",
              help="Writes OUT.safetensors. Default: PREFIX.ref-logps, beside the shards.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Sequences per forward.")
@click.option("--verify-data/--no-verify-data", default=True, show_default=True,
              help="Check every shard's sha256 against its manifest first.")
@click.option("--resume", is_flag=True, help="Continue from OUT.safetensors.partial (rewritten every minute).")
@quiet_option()
@to_click_errors
def dpo_ref(data, model_dir, adapter, output, batch_size, verify_data, resume, quiet):
    from ernie_train.dpo_ref import compute_ref_logps
    with Progress("ernie-train dpo-ref", quiet=quiet, unit="sequences") as progress:
        summary = compute_ref_logps(data, model_dir, output, adapter=adapter, batch_size=batch_size,
                                    verify_data=verify_data, resume=resume,
                                    on_progress=lambda n, p: progress.update(n, p))
    emit_json(summary)


def main():
    run_main(cli, "ernie-train", interrupted_hint="rerun with --resume to continue from the last checkpoint "
             "(dpo-ref: from its last partial file)")


if __name__ == "__main__":
    sys.exit(main())
