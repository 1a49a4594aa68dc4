"""The OpenAI-compatible API over loopback: models, completions and chat (plain and streamed), the
error shapes, overload (429/503 with Retry-After, never out of memory) and clients that go away
(their KV cache row is freed and the next request is served). Clients are bounded aiohttp sessions."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest


def run(coro):
    return asyncio.run(coro)


async def post(session, url, body, **kw):
    async with session.post(url, json=body, **kw) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def sse(session, url, body):
    """The data payloads of a streamed response, [DONE] included."""
    out = []
    async with session.post(url, json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        async for line in r.content:
            line = line.decode().strip()
            if line:
                assert line.startswith("data: ")
                out.append(line[6:])
    return out


def wait_until(cond, what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_models_completions_chat_and_streams(http_stack):
    url, serving = http_stack()

    async def main():
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/models") as r:
                models = (await r.json())["data"]
            cards = {m["id"]: m for m in models}
            assert set(cards) == {"base", "lora-a", "lora-b", "ia3"}
            assert cards["base"]["parent"] is None and cards["lora-a"]["parent"] == "base"
            assert cards["lora-a"]["root"].endswith("lora-a") and all(m["object"] == "model" for m in models)
            async with s.get(f"{url}/v1/models/ia3") as r:
                assert (await r.json())["id"] == "ia3"

            body = {"model": "lora-a", "prompt": "reverse: abcdef\n", "max_tokens": 12, "temperature": 0,
                    "ignore_eos": True}
            status, full, _ = await post(s, f"{url}/v1/completions", body)
            assert status == 200 and full["object"] == "text_completion"
            assert full["usage"] == {"prompt_tokens": 17, "completion_tokens": 12, "total_tokens": 29}
            assert full["choices"][0]["finish_reason"] == "length" and full["system_fingerprint"] == "lora-a"
            text = full["choices"][0]["text"]

            events = await sse(s, f"{url}/v1/completions",
                               {**body, "stream": True, "stream_options": {"include_usage": True}})
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
            assert chunks[-2]["choices"][0]["finish_reason"] == "length"
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12

            # a stop string cuts the text before it, and finishes with "stop"
            cut = next((i for i in range(2, len(text)) if text[i] != "\ufffd" and text[i] not in text[:i]), None)
            if cut is not None:
                status, stopped, _ = await post(s, f"{url}/v1/completions", {**body, "stop": [text[cut]]})
                assert stopped["choices"][0] == {**stopped["choices"][0], "text": text[:cut], "finish_reason": "stop"}

            chat = {"model": "ia3", "messages": [{"role": "user", "content": "reverse: abc\n"}], "max_tokens": 10,
                    "temperature": 0, "ignore_eos": True}
            status, full, _ = await post(s, f"{url}/v1/chat/completions", chat)
            assert status == 200 and full["object"] == "chat.completion"
            message = full["choices"][0]["message"]
            assert message["role"] == "assistant"
            # muxtune's plain template: the user's text after BOS, exactly a completion of that prompt
            plain = {k: v for k, v in chat.items() if k != "messages"}
            _, same, _ = await post(s, f"{url}/v1/completions", {**plain, "prompt": "reverse: abc\n"})
            assert same["choices"][0]["text"] == message["content"]
            events = await sse(s, f"{url}/v1/chat/completions", {**chat, "stream": True})
            chunks = [json.loads(e) for e in events[:-1]]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert all(c["object"] == "chat.completion.chunk" for c in chunks)
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == message["content"]
            assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    run(main())


ERRORS = [  # path, body, status, param, code
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model",
     "model_not_found"),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "temperature": 3}, 400, "temperature", None),
    ("/v1/completions", {"model": "lora-a"}, 400, "prompt", None),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "n": 2, "best_of": 3}, 400, "best_of", None),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "logprobs": 21}, 400, "logprobs", None),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "logit_bias": {"99999": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"model": "lora-a", "prompt": [[1, 2], []]}, 400, "prompt", None),
    ("/v1/chat/completions", {"model": "lora-a", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     400, None, None),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "lora-a", "prompt": [1, 2, 99999]}, 400, "prompt", None),
    ("/v1/completions", {"model": "lora-a", "prompt": "x" * 250, "max_tokens": 10}, 400, "max_tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"model": "lora-a", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ("/v1/chat/completions", {"model": "lora-a", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "lora-a", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role", None),
    ("/v1/completions", ["not", "an", "object"], 400, None, None),
    ("/v1/nothing", {}, 404, None, None),
]


def test_errors_have_openai_shape(http_stack):
    url, serving = http_stack(max_model_len=256, max_tokens=1024)

    async def main():
        async with aiohttp.ClientSession() as s:
            for path, body, status, param, code in ERRORS:
                got, err, _ = await post(s, url + path, body)
                assert got == status, (body, err)
                assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
                assert err["error"]["message"] and (err["error"]["param"], err["error"]["code"]) == (param, code), body
            async with s.post(f"{url}/v1/completions", data=b"{not json") as r:
                assert r.status == 400 and "JSON" in (await r.json())["error"]["message"]
            # the server is unharmed: a good request right after
            ok, good, _ = await post(s, f"{url}/v1/completions", {"model": "lora-a", "prompt": "x", "max_tokens": 2})
            assert ok == 200 and good["usage"]["completion_tokens"] >= 1

    run(main())


def test_overload_gets_429_with_retry_after_and_the_rest_complete(http_stack):
    url, serving = http_stack(max_num_seqs=1, max_queue=2, max_tokens=2000)
    eng = serving.engine
    body = {"model": "lora-b", "prompt": "upper: abc\n", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    long = {**body, "max_tokens": 300}

    async def main():
        async with aiohttp.ClientSession() as s:
            # One request holds the only row first: a burst that raced the engine thread's pick-up would
            # find the first arrival still waiting, and the queue's bound alone (2) would decide.
            holder = asyncio.create_task(post(s, f"{url}/v1/completions", long))
            while not eng.running:
                await asyncio.sleep(0.01)
            results = await asyncio.gather(*[post(s, f"{url}/v1/completions", body) for _ in range(7)])
            status, payload, _ = await holder
            assert status == 200 and payload["usage"]["completion_tokens"] == 300
            codes = sorted(r[0] for r in results)
            assert codes.count(429) >= 1 and codes.count(200) >= 2, codes  # the queue took 2 behind the holder
            for status, payload, headers in results:
                if status == 429:
                    assert int(headers["Retry-After"]) >= 1 and payload["error"]["type"] == "rate_limit_error"
                else:
                    assert status == 200 and payload["usage"]["completion_tokens"] == 30
            serving.engine.close("test shutdown")  # no longer accepting: 503 with Retry-After
            status, payload, headers = await post(s, f"{url}/v1/completions", body)
            assert status == 503 and "Retry-After" in headers and payload["error"]["code"] == "service_unavailable"

    run(main())
    assert serving.engine.pool.used == 0
    assert serving.metrics.registry.get_sample_value("muxtune_serve_rejected_requests_total", {"status": "429"}) >= 1


def test_clients_that_disconnect_free_their_slot(http_stack):
    url, serving = http_stack(max_num_seqs=1, max_tokens=2000)
    eng = serving.engine
    long = {"model": "lora-a", "prompt": "reverse: abc\n", "max_tokens": 1500, "temperature": 0, "ignore_eos": True}

    def aborted():
        return serving.metrics.registry.get_sample_value("muxtune_serve_requests_total",
                                                         {"model": "lora-a", "outcome": "abort"})

    async def stream_then_leave():
        async with aiohttp.ClientSession() as s:
            async with s.post(f"{url}/v1/completions", json={**long, "stream": True}) as r:
                assert r.status == 200
                await r.content.readline()  # the first token arrived: now hang up mid-generation

    run(stream_then_leave())
    wait_until(lambda: eng.pool.used == 0 and not eng.running, "the streaming request's row to be freed")
    assert aborted() == 1

    async def queued_then_leave():
        async with aiohttp.ClientSession() as s:
            holder = asyncio.create_task(post(s, f"{url}/v1/completions", long))  # occupies the only row
            while not eng.running:
                await asyncio.sleep(0.02)
            with pytest.raises(asyncio.TimeoutError):  # waits in the queue, then its client gives up
                await post(s, f"{url}/v1/completions", {**long, "max_tokens": 3},
                           timeout=aiohttp.ClientTimeout(total=0.5))
            holder.cancel()  # and the generating one goes away too
            with pytest.raises(asyncio.CancelledError):
                await holder

    run(queued_then_leave())
    wait_until(lambda: eng.pool.used == 0 and not eng.running and eng.queue_depth == 0, "both requests to be dropped")
    assert aborted() == 3

    async def next_one():
        async with aiohttp.ClientSession() as s:
            return await post(s, f"{url}/v1/completions", {**long, "max_tokens": 4})

    status, payload, _ = run(next_one())
    assert status == 200 and payload["usage"]["completion_tokens"] == 4
