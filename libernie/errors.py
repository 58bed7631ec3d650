"""Typed errors. Every message is one line that names the file (and record) and says what to do;
the tools turn an ErnieError into `Error: <message>` and exit status 1."""


class ErnieError(Exception):
    """Base of every error libernie raises; its message is one line naming the file and what to do."""


class ConfigError(ErnieError):
    """config.json is missing, malformed, or describes a model we cannot build."""


class CheckpointError(ErnieError):
    """A checkpoint directory or safetensors file is missing, truncated, corrupt or inconsistent."""


class TokenizerError(ErnieError):
    """A tokenizer path is missing or corrupt, its special pieces are wrong, or chat messages are malformed."""


class DataError(ErnieError):
    """An input record is bad: invalid JSON, a missing or mistyped field, empty text, src/tgt mismatch.

    Carries `path`, `line` (1-based) and `reason` (a short key such as "invalid_json" that
    `--skip-bad` counts); the message reads `PATH:LINE: what is wrong; what to do`.
    """

    def __init__(self, path: str, line: int, reason: str, detail: str):
        self.path, self.line, self.reason, self.detail = path, line, reason, detail
        super().__init__(f"{path}:{line}: {detail}")


class ShardFormatError(ErnieError):
    """A packed shard (.npy/.idx) or its manifest is missing, truncated, corrupt or inconsistent."""


class PackError(ErnieError):
    """ernie-pack cannot run as asked: bad options, a resume state that does not match, an unreadable input."""


class LoRAError(ErnieError):
    """A LoRA configuration or adapter directory that cannot be applied to the model."""


class OutputPathError(ErnieError):
    """An output path that cannot be created or written (a missing parent that cannot be made, a read-only
    or non-directory parent, a directory where a file is wanted). Raised before any input is read."""


class NonFiniteLogitsError(ErnieError):
    """The model produced NaN or infinite logits: its weights are broken (e.g. saved from a diverged run)."""
