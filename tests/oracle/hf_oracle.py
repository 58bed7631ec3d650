"""The independent side of the parity tests. Runs ONLY in .venv-oracle (transformers on CPU torch);
never imports libernie or paddle. The pytest side (test_parity.py) drives it through subprocess.

  build SPEC.json OUT   make tiny random Ernie4_5ForCausalLM (or, with moe_* keys in the config,
                        Ernie4_5_MoeForCausalLM) models with transformers, save them in
                        the HF layout, and record their logits (and greedy continuations) on given ids
  run SPEC.json         load checkpoints written by libernie with transformers, record the same
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config,
                          Ernie4_5ForCausalLM)

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _record(model, case, out_dir):
    ids = torch.tensor(case["input_ids"], dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().numpy()
        np.save(os.path.join(out_dir, "ref_logits.npy"), logits)
        if case.get("generate"):
            prompt = ids[:1, : case["generate"]["prompt_len"]]
            gen = model.generate(prompt, max_new_tokens=case["generate"]["new_tokens"], do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            np.save(os.path.join(out_dir, "ref_greedy.npy"), gen[0, prompt.shape[1]:].numpy())


def build(spec_path, out_root):
    for case in json.load(open(spec_path)):
        torch.manual_seed(case["seed"])
        moe = "moe_num_experts" in case["config"]
        cfg = (Ernie4_5_MoeConfig if moe else Ernie4_5Config)(**case["config"])
        model = (Ernie4_5_MoeForCausalLM if moe else Ernie4_5ForCausalLM)(cfg).eval()
        with torch.no_grad():  # transformers inits norms to 1: perturb them so the mapping is tested
            for name, p in model.named_parameters():
                if "e_score_correction_bias" in name:  # zero-initialised: make it move the selection
                    p.normal_(0.0, case.get("correction_bias_std", 0.0))
                elif "norm" in name:
                    p.normal_(1.0, 0.2)
                elif name.endswith("bias"):
                    p.normal_(0.0, 0.05)
        out_dir = os.path.join(out_root, case["name"])
        model.save_pretrained(out_dir, max_shard_size=case.get("max_shard_size", "5GB"))
        _record(model, case, out_dir)


def run(spec_path):
    for case in json.load(open(spec_path)):
        model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32).eval()
        _record(model, case, case["dir"])


if __name__ == "__main__":
    {"build": lambda: build(sys.argv[2], sys.argv[3]), "run": lambda: run(sys.argv[2])}[sys.argv[1]]()
