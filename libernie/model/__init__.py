from libernie.model.cache import KVCache
from libernie.model.ernie import CausalLMOutput, ErnieForCausalLM, ErnieModel
from libernie.model.loss import IGNORE_INDEX, causal_lm_loss

__all__ = ["ErnieForCausalLM", "ErnieModel", "CausalLMOutput", "KVCache", "causal_lm_loss", "IGNORE_INDEX"]
