"""OpenAI request bodies, their validation, and OpenAI-style errors.

Bodies are pydantic models in strict mode, so a wrong type is a 400 naming the field instead of a
silent coercion ("5" is not an int). Unknown fields are ignored, as the OpenAI API does, so clients
that send `user` or `metadata` keep working. Extensions shared with vLLM/FastDeploy: top_k,
repetition_penalty, stop_token_ids, ignore_eos.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from libernie.sampling import SamplingParams


class OpenAIError(Exception):
    """Becomes {"error": {"message", "type", "param", "code"}} with HTTP `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Sampling(_Body):
    """Fields that /v1/completions and /v1/chat/completions share."""
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=100.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)          # -1 or 0: no cut (vLLM uses -1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    ignore_eos: bool = False

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(0, self.top_k or 0), top_p=1.0 if self.top_p is None else self.top_p,
            repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty)

    def stops(self) -> tuple[str, ...]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stop):
            raise bad_request("stop strings must not be empty", param="stop")
        if len(stop) > 16:
            raise bad_request("at most 16 stop strings", param="stop")
        return tuple(stop)

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)          # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def rendered_messages(self) -> list[dict]:
        """Messages as libernie's chat template wants them; `developer` is OpenAI's new name for system."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]


def prompt_list(prompt) -> list:
    """CompletionRequest.prompt as a list of prompts, each a str or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", param="prompt")
    return list(prompt)


def validation_error(errors: list[dict]) -> OpenAIError:
    """One OpenAIError for pydantic/FastAPI validation errors: the first one, in one line."""
    if not errors:
        return bad_request("invalid request")
    e = errors[0]
    if e.get("type") == "json_invalid":
        ctx = (e.get("ctx") or {}).get("error", "")
        return bad_request(f"malformed JSON body: {ctx}".rstrip(": "), code="invalid_json")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # Drop pydantic's union-branch names (e.g. "str", "list[TextPart]") from the field path.
    param = ".".join(x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float",
                                                                                    "bool", "function-after"))
    if e.get("type") == "missing" and not loc:
        return bad_request("request body must be a JSON object", code="invalid_body")
    msg = " ".join(str(e.get("msg", "invalid value")).split())
    return bad_request(f"{param or 'body'}: {msg}", param=param or None, code=e.get("type"))
