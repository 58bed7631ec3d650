"""A chat session against a running ernie-serve (or any OpenAI-compatible server), like `erniekit chat`.

Pure API: `ChatSession.ask(text)` yields the reply's text pieces as they stream in and keeps the
history; the `ernie-chat` command in cli.py reads lines and prints the pieces.
"""
from __future__ import annotations

from typing import Iterator


class ChatError(Exception):
    """The server could not be reached or answered with an error; the message is one line."""


class ChatSession:
    """History of one conversation. url: the server root, e.g. http://127.0.0.1:8188."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None,
                 system: str | None = None, temperature: float = 0.7, top_p: float = 1.0,
                 max_tokens: int | None = 256, seed: int | None = None, timeout: float = 600.0):
        import openai  # imported here so `ernie-serve` itself never needs the client package

        self._openai = openai
        self.client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none",
                                    timeout=timeout, max_retries=0)
        self.system, self.temperature, self.top_p = system, temperature, top_p
        self.max_tokens, self.seed = max_tokens, seed
        self.model = model or self._only_model()
        self.history: list[dict] = []

    def _only_model(self) -> str:
        try:
            models = self.client.models.list().data
        except self._openai.OpenAIError as e:
            raise ChatError(_one_line(e)) from None
        if not models:
            raise ChatError("the server lists no models")
        return models[0].id

    def reset(self) -> None:
        self.history = []

    def ask(self, text: str) -> Iterator[str]:
        """Send `text` as the next user turn; yield reply pieces. The turn is kept only if it completes."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            stream = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, temperature=self.temperature,
                top_p=self.top_p, max_tokens=self.max_tokens, seed=self.seed)
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta and choice.delta.content:
                        reply.append(choice.delta.content)
                        yield choice.delta.content
        except self._openai.OpenAIError as e:
            raise ChatError(_one_line(e)) from None
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(reply)}]


def _one_line(e) -> str:
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return " ".join(body["message"].split())
    return " ".join(str(e).split())
