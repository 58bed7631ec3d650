"""The independent side of the DPO log-prob parity test. Runs ONLY in .venv-oracle (transformers on CPU
torch); never imports libernie or paddle. The pytest side (test_dpo_parity.py) drives it by subprocess.

  logps SPEC.json OUT.json   for each pair {prompt, chosen, rejected} (token ids), run prompt+chosen and
                             prompt+rejected as two separate unpacked sequences through
                             Ernie4_5ForCausalLM and write the summed log-probs of the response tokens
"""
import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def response_logp(model, prompt, response):
    ids = torch.tensor([prompt + response], dtype=torch.long)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)[0]   # [L, V]
    # token at position t is predicted by position t-1; the response starts at len(prompt)
    return float(sum(logp[len(prompt) + k - 1, tok] for k, tok in enumerate(response)))


def main(spec_path, out_path):
    spec = json.load(open(spec_path))
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    out = [{"chosen": response_logp(model, p["prompt"], p["chosen"]),
            "rejected": response_logp(model, p["prompt"], p["rejected"])} for p in spec["pairs"]]
    json.dump(out, open(out_path, "w"))


if __name__ == "__main__":
    assert sys.argv[1] == "logps", sys.argv
    main(sys.argv[2], sys.argv[3])
