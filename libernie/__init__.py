"""libernie: the ERNIE 4.5 model, tokenizer, checkpoint formats and kernels shared by the ernie-* tools."""
from libernie._env import apply_cpu_defaults

apply_cpu_defaults()  # must run before anything imports paddle

__version__ = "0.1.0"
