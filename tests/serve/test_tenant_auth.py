"""Per-namespace serving tokens (engine/serve/tenant_auth.py) in front of the real OpenAI API handlers,
over tests/conftest.py's stub engine (a 429 means the request reached the engine; 404/401 that it did not)."""
from __future__ import annotations

import asyncio
import json

import pytest

from muxtune.facts.trust import token_digest

MODELS = ["team-a/a-task", "team-b/b-secret"]
TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}


@pytest.fixture
def _client(tenant_api):
    def make(tmp_path, with_tokens=True):
        f = None
        if with_tokens:
            f = tmp_path / "tokens.json"
            f.write_text(json.dumps({token_digest(t): ns for t, ns in TOKENS.items()}))
        return tenant_api(MODELS, f)
    return make


def _hdr(token):
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _request(c, method, path, token, model=None):
    body = {"model": model, "prompt": [1, 2, 3], "max_tokens": 2} if model else None
    async with c.request(method, path, headers=_hdr(token), json=body) as r:
        return r.status, await r.json(content_type=None) if r.status != 200 or path != "/health" else None


def test_caller_sees_and_reaches_only_its_namespace(tmp_path, _client):
    async def main():
        async with _client(tmp_path) as c:
            async with c.get("/v1/models", headers=_hdr("tok-a")) as r:
                assert r.status == 200
                assert [m["id"] for m in (await r.json())["data"]] == ["base", "team-a/a-task"]
            # another namespace's adapter: the same 404 as a model that does not exist
            foreign = await _request(c, "POST", "/v1/completions", "tok-a", "team-b/b-secret")
            missing = await _request(c, "POST", "/v1/completions", "tok-a", "team-b/nothing")
            assert foreign[0] == missing[0] == 404
            assert foreign[1]["error"]["code"] == missing[1]["error"]["code"] == "model_not_found"
            assert (await _request(c, "POST", "/v1/chat/completions", "tok-a", "team-b/b-secret"))[0] == 404
            assert (await _request(c, "GET", "/v1/models/team-b/b-secret", "tok-a"))[0] == 404
            # its own adapter and the shared base reach the engine
            assert (await _request(c, "POST", "/v1/completions", "tok-a", "team-a/a-task"))[0] == 429
            assert (await _request(c, "POST", "/v1/completions", "tok-b", "team-b/b-secret"))[0] == 429
            assert (await _request(c, "POST", "/v1/completions", "tok-b", "base"))[0] == 429
            assert (await _request(c, "GET", "/v1/models/team-a/a-task", "tok-a"))[0] == 200

    asyncio.run(main())


@pytest.mark.parametrize("token", [None, "", "tok-c", "Basic dG9rLWE="])
def test_no_or_unknown_token_is_refused(tmp_path, token, _client):
    async def main():
        async with _client(tmp_path) as c:
            hdr = {"Authorization": token} if token and token.startswith("Basic") else _hdr(token)
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics")):
                body = {"model": "team-a/a-task", "prompt": [1], "max_tokens": 1} if method == "POST" else None
                async with c.request(method, path, headers=hdr, json=body) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
            async with c.get("/health") as r:  # probes need no token
                assert r.status == 200

    asyncio.run(main())


def test_tenants_get_no_serving_metrics_and_tokens_follow_the_file(tmp_path, _client):
    async def main():
        async with _client(tmp_path) as c:
            assert (await _request(c, "GET", "/metrics", "tok-a"))[0] == 404
            (tmp_path / "tokens.json").write_text(json.dumps({token_digest("tok-new"): "team-b"}))
            async with c.get("/v1/models", headers=_hdr("tok-new")) as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["base", "team-b/b-secret"]
            assert (await _request(c, "GET", "/v1/models", "tok-a"))[0] == 401  # a replaced token is gone

    asyncio.run(main())


def test_without_a_token_file_nothing_changes(tmp_path, _client):
    async def main():
        async with _client(tmp_path, with_tokens=False) as c:
            async with c.get("/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["base", *MODELS]
            assert (await _request(c, "POST", "/v1/completions", None, "team-b/b-secret"))[0] == 429

    asyncio.run(main())


def test_a_malformed_token_file_fails_at_startup(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps(["not", "a", "map"]))
    from muxtune.engine.serve.tenant_auth import TenantTokens

    with pytest.raises(ValueError):
        TenantTokens(f)
