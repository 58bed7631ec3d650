"""The independent side of ernie-merge's oracle tests. Runs ONLY in .venv-oracle (transformers + PEFT on CPU
torch); never imports libernie or paddle. test_merge_oracle.py drives it through subprocess.

  build SPEC.json OUT   per case: a tiny random Ernie4_5ForCausalLM saved in the HF layout (base/), a PEFT LoRA
                        with random A and B saved as safetensors (adapter/), and on the case's input_ids the
                        logits of the adapted model (adapted_logits.npy) and of PEFT's merge_and_unload
                        (peft_merged_logits.npy)
  run SPEC.json         load each case's "dir" with transformers and save its logits as logits.npy there
"""
import json
import os
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def build(spec_path, out_root):
    from peft import LoraConfig, get_peft_model

    for case in json.load(open(spec_path)):
        torch.manual_seed(case["seed"])
        model = Ernie4_5ForCausalLM(Ernie4_5Config(**case["config"])).eval()
        with torch.no_grad():  # transformers inits norms to 1: perturb them so the mapping is tested
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0, 0.2)
        out = os.path.join(out_root, case["name"])
        model.save_pretrained(os.path.join(out, "base"), max_shard_size=case.get("max_shard_size", "5GB"))
        peft_model = get_peft_model(model, LoraConfig(**case["lora"]))
        with torch.no_grad():  # lora_B starts at zero: randomize every LoRA matrix so the merge matters
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.1)
                elif "modules_to_save" in name:  # a trained copy must differ from the base to be tested
                    p.add_(torch.randn_like(p) * 0.1)
        peft_model.eval()
        np.save(os.path.join(out, "adapted_logits.npy"), _logits(peft_model, case["input_ids"]))
        peft_model.save_pretrained(os.path.join(out, "adapter"))
        merged = peft_model.merge_and_unload()
        np.save(os.path.join(out, "peft_merged_logits.npy"), _logits(merged, case["input_ids"]))


def run(spec_path):
    for case in json.load(open(spec_path)):
        model = AutoModelForCausalLM.from_pretrained(case["dir"], dtype=torch.float32).eval()
        np.save(os.path.join(case["dir"], "logits.npy"), _logits(model, case["input_ids"]))


if __name__ == "__main__":
    {"build": lambda: build(sys.argv[2], sys.argv[3]), "run": lambda: run(sys.argv[2])}[sys.argv[1]]()
