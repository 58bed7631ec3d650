"""KV cache for incremental decoding: per layer, keys and values of every position seen so far."""
import paddle


class KVCache:
    """Keys/values per layer, each [b, nkv, t, hd] (head-major: what the attention kernels read without
    a transpose); `update` appends the new positions.

    Concatenation keeps this simple and exact; a paged or preallocated cache (ernie-serve)
    can replace it as long as it offers `update(layer, k, v)` and `seq_len`.
    """

    def __init__(self, num_layers: int):
        self.keys: list[paddle.Tensor | None] = [None] * num_layers
        self.values: list[paddle.Tensor | None] = [None] * num_layers

    @property
    def seq_len(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(self, layer: int, k: paddle.Tensor, v: paddle.Tensor) -> tuple[paddle.Tensor, paddle.Tensor]:
        """Append k, v [b, nkv, s, hd] for `layer`; return all keys/values [b, nkv, t+s, hd]."""
        if self.keys[layer] is not None:
            k = paddle.concat([self.keys[layer], k], axis=2)
            v = paddle.concat([self.values[layer], v], axis=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def select(self, index: paddle.Tensor) -> None:
        """Keep only batch rows `index` (sequences that finished leave the batch)."""
        self.keys = [None if k is None else paddle.gather(k, index) for k in self.keys]
        self.values = [None if v is None else paddle.gather(v, index) for v in self.values]
