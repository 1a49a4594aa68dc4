"""POST /v1/completions, as vLLM serves it: a prompt as text, token ids, or a list of either (one
group of n choices per prompt, indexed prompt x n + i); echo (the prompt before the answer, and
with logprobs its tokens' logprobs: how lm-evaluation-harness scores a loglikelihood, max_tokens 0
or 1); logprobs with top alternatives in the legacy shape (tokens, token_logprobs, top_logprobs,
text_offset)."""
from __future__ import annotations

from muxtune.engine.serve import protocol
from muxtune.engine.serve.chat import encode_prompt
from muxtune.engine.serve.logprobs import completion_logprobs
from muxtune.engine.serve.serving import Choice, OpenAIServing


class CompletionServing(OpenAIServing):
    request_class = protocol.CompletionRequest
    chat = False

    def make_choices(self, req: protocol.CompletionRequest) -> list[Choice]:
        out = []
        for p, prompt in enumerate(req.prompts):
            if isinstance(prompt, str):
                ids, text = encode_prompt(self.tokenizer, prompt), prompt
            else:
                ids = self.check_ids(list(prompt), "prompt")
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else None
            out += [Choice(index=p * req.n + i, prompt=p, prompt_ids=ids, prompt_text=text) for i in range(req.n)]
        return out

    def logprob_counts(self, req: protocol.CompletionRequest) -> tuple[int | None, int | None]:
        return req.logprobs, (req.logprobs if req.echo and req.logprobs is not None else None)

    def _decode(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _logprobs(self, req, c: Choice, entries: list, with_prompt: bool) -> dict | None:
        if req.logprobs is None:
            return None
        prompt = c.gen.prompt_logprobs if with_prompt and req.echo else []
        return completion_logprobs(self._decode, prompt + entries)

    def render_full(self, ids: protocol.ResponseIds, req, choices: list[Choice]) -> dict:
        out = []
        for c in choices:
            text = (c.prompt_text if req.echo else "") + c.text
            out.append({"index": c.index, "text": text, "logprobs": self._logprobs(req, c, c.logprobs, True),
                        "finish_reason": c.done.finish_reason, "stop_reason": None})
        return {**ids.head("text_completion"), "choices": out, "usage": protocol.usage(*self.usage(choices))}

    def render_chunk(self, ids: protocol.ResponseIds, req, c: Choice, text: str, entries: list,
                     finish: str | None) -> dict:
        first = not c.opened
        if first and req.echo:
            text = c.prompt_text + text
        choice = {"index": c.index, "text": text, "logprobs": self._logprobs(req, c, entries, first),
                  "finish_reason": finish, "stop_reason": None}
        if finish is not None:
            choice["logprobs"] = None
        return {**ids.head("text_completion"), "choices": [choice]}
