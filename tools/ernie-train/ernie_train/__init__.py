"""ernie-train: pretraining and SFT (full and LoRA) on ernie-pack shards. The API is `train(TrainConfig)`."""
from ernie_train.config import TrainConfig
from ernie_train.trainer import train

__all__ = ["TrainConfig", "train"]
