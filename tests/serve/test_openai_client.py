"""The official OpenAI Python client against the server: streaming with usage, n > 1, logprobs
(completions with echo, and chat top_logprobs), batched and token-id prompts; and a client that
closes a stream early leaves no traceback, only a count in muxtune_serve_client_disconnects_total."""
from __future__ import annotations

import logging

import aiohttp
import pytest

pytestmark = pytest.mark.slow


def test_openai_client_streams_n_and_logprobs(http_stack, caplog):
    import openai

    url, serving = http_stack(max_model_len=256)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    prompt = "reverse: abcdef\n"
    c = client.completions.create(model="lora-a", prompt=prompt, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True}, n=3, logprobs=2, echo=True)
    assert [ch.index for ch in c.choices] == [0, 1, 2] and len({ch.text for ch in c.choices}) == 1  # greedy
    lp = c.choices[0].logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == c.usage.prompt_tokens + 6
    assert c.choices[0].text.startswith(prompt) and c.usage.completion_tokens == 18

    for prompts in ([prompt, "upper: abc\n"], [[1, 114, 101], [1, 117]]):  # texts, or token-id lists
        sampled = client.completions.create(model="lora-a", prompt=prompts, max_tokens=8, n=2, seed=3,
                                            extra_body={"ignore_eos": True})
        assert sorted(ch.index for ch in sampled.choices) == [0, 1, 2, 3]
        assert sampled.choices[0].text != sampled.choices[1].text  # choice i samples with seed + i

    chat = client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=5, n=2, logprobs=True, top_logprobs=3, seed=1,
                                          extra_body={"ignore_eos": True})
    assert len(chat.choices) == 2
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 3 for t in content)

    stream = client.chat.completions.create(model="lora-a", messages=[{"role": "user", "content": prompt}],
                                            max_tokens=6, n=2, stream=True, stream_options={"include_usage": True},
                                            logprobs=True, extra_body={"ignore_eos": True})
    texts, usage, finished = {0: "", 1: ""}, None, set()
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and usage.completion_tokens == 12 and all(texts.values())

    async def close_early():
        async with aiohttp.ClientSession() as s:
            body = {"model": "lora-a", "prompt": prompt, "max_tokens": 200, "stream": True, "ignore_eos": True}
            async with s.post(f"{url}/v1/completions", json=body) as r:
                await r.content.readline()  # the first chunk, then hang up

    import asyncio
    import time

    with caplog.at_level(logging.DEBUG):
        asyncio.run(close_early())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "muxtune_serve_client_disconnects_total{model=\"lora-a\"} 1.0" \
                not in serving.metrics.render()[0].decode():
            time.sleep(0.1)
    assert "muxtune_serve_client_disconnects_total{model=\"lora-a\"} 1.0" in serving.metrics.render()[0].decode()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
