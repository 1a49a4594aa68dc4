"""POST /v1/chat/completions: messages rendered by the chat template (chat.py), n choices, and
logprobs / top_logprobs in the chat shape ({"content": [{token, logprob, bytes, top_logprobs}]})."""
from __future__ import annotations

from muxtune.engine.serve import protocol
from muxtune.engine.serve.chat import encode_chat
from muxtune.engine.serve.logprobs import chat_logprobs
from muxtune.engine.serve.serving import Choice, OpenAIServing


class ChatServing(OpenAIServing):
    request_class = protocol.ChatCompletionRequest
    chat = True

    def __init__(self, engine, tokenizer, metrics=None, tokenize_pool=None, template: str | None = None):
        super().__init__(engine, tokenizer, metrics, tokenize_pool)
        self.template = template

    def make_choices(self, req: protocol.ChatCompletionRequest) -> list[Choice]:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in req.messages]
        ids = encode_chat(self.tokenizer, messages, self.template)
        return [Choice(index=i, prompt=0, prompt_ids=ids, prompt_text=None) for i in range(req.n)]

    def logprob_counts(self, req: protocol.ChatCompletionRequest) -> tuple[int | None, int | None]:
        return ((req.top_logprobs or 0) if req.logprobs else None), None

    def _bytes(self, token: int) -> bytes:
        return self.tokenizer.decode([token]).encode()

    def _logprobs(self, req, entries: list) -> dict | None:
        return chat_logprobs(self._bytes, entries) if req.logprobs else None

    def render_full(self, ids: protocol.ResponseIds, req, choices: list[Choice]) -> dict:
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(req, c.logprobs), "finish_reason": c.done.finish_reason,
                "stop_reason": None} for c in choices]
        return {**ids.head("chat.completion"), "choices": out, "usage": protocol.usage(*self.usage(choices))}

    def render_chunk(self, ids: protocol.ResponseIds, req, c: Choice, text: str, entries: list,
                     finish: str | None) -> dict:
        if finish is not None:
            delta = {}
        elif not c.opened:
            delta = {"role": "assistant", "content": text}
        else:
            delta = {"content": text} if text else {}
        logprobs = self._logprobs(req, entries) if finish is None else None
        choice = {"index": c.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**ids.head("chat.completion.chunk"), "choices": [choice]}
