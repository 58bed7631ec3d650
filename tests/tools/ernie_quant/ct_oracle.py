"""The independent side of the compressed-tensors tests. Runs ONLY in .venv-oracle (transformers 5.23 +
compressed-tensors 0.20 on CPU torch); never imports libernie or paddle.

  run SPEC.json    for each case: load case["dir"] with AutoModelForCausalLM (compressed-tensors decompresses
                   it to float), save logits on case["input_ids"] to DIR/hf_logits.npy, and unpack
                   case["packed"] (a weight_packed tensor) with compressed_tensors' own unpacker to DIR/ct_q.npy
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def run(spec_path):
    for case in json.load(open(spec_path)):
        d = case["dir"]
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(case["input_ids"])).logits.float().numpy()
        np.save(os.path.join(d, "hf_logits.npy"), logits)
        if case.get("packed"):
            from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
            index = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
            name = case["packed"]
            with safe_open(os.path.join(d, index[name]), "pt") as f:
                packed = f.get_tensor(name)
                shape = f.get_tensor(name.replace("weight_packed", "weight_shape"))
            q = unpack_from_int32(packed, case["bits"], torch.Size(shape.tolist()))
            np.save(os.path.join(d, "ct_q.npy"), q.numpy())


if __name__ == "__main__":
    {"run": lambda: run(sys.argv[2])}[sys.argv[1]]()
