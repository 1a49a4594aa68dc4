"""Adapters loaded and unloaded at runtime, vLLM's way (POST /v1/load_lora_adapter and
/v1/unload_lora_adapter): only with the flag, only from under the allowed roots; a loaded adapter is
listed and answers exactly as PeftModel.generate; bad directories are refused with a 400 that says why
and lose nothing; an unloaded adapter answers 404 and its slot is freed."""
from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def http(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def loading_server(tiny_backbone, loop_thread, tmp_path):
    """A server with no adapters and runtime loading from tmp_path/root (yields its URL and stack)."""
    from muxtune.engine.serve.stack import Serving
    from tests.helpers.serving import serve_flags

    root = tmp_path / "root"
    root.mkdir()
    serving = Serving(tiny_backbone, "base", serve_flags(), host="127.0.0.1", port=0, lora_roots=[root]).start()
    with loop_thread(serving.loop):
        yield f"http://127.0.0.1:{serving.http.port}", serving, root
    serving.close()


def greedy(url, model, ids, n=12):
    """(status, generated text) of a greedy completion of token-ID prompt ids."""
    status, body = http(f"{url}/v1/completions", {"model": model, "prompt": ids, "max_tokens": n, "temperature": 0,
                                                  "ignore_eos": True})
    return status, (json.loads(body)["choices"][0]["text"] if status == 200 else body)


def test_disabled_by_default_the_routes_do_not_exist(http_stack):
    url, _ = http_stack()
    for route in ("load_lora_adapter", "unload_lora_adapter"):
        assert http(f"{url}/v1/{route}", {"lora_name": "x", "lora_path": "/tmp"})[0] == 404


def test_load_answer_and_unload_as_vllm(loading_server, trained_adapters, peft_reference):
    url, serving, root = loading_server
    shutil.copytree(trained_adapters["lora-a"], root / "lora-a")
    status, text = http(f"{url}/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": str(root / "lora-a")})
    assert (status, text) == (200, "Success: LoRA adapter 'mine' added successfully.")
    assert "mine" in [m["id"] for m in json.loads(http(f"{url}/v1/models")[1])["data"]]
    ids = serving.engine.tokenizer("reverse: abcdef\n")["input_ids"]
    status, text = greedy(url, "mine", ids)
    expected = peft_reference(root / "lora-a", ids, 12, True)
    assert status == 200 and text == serving.engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert text != greedy(url, "base", ids)[1], "the adapter changes the answer"
    again = http(f"{url}/v1/load_lora_adapter", {"lora_name": "mine", "lora_path": str(root / "lora-a")})
    assert again[0] == 400 and "has already been loaded" in again[1]
    assert http(f"{url}/v1/load_lora_adapter", {"lora_name": "mine"})[0] == 400

    assert http(f"{url}/v1/unload_lora_adapter", {"lora_name": "mine"}) == \
        (200, "Success: LoRA adapter 'mine' removed successfully.")
    assert "mine" not in [m["id"] for m in json.loads(http(f"{url}/v1/models")[1])["data"]]
    assert greedy(url, "mine", ids)[0] == 404
    gone = http(f"{url}/v1/unload_lora_adapter", {"lora_name": "mine"})
    assert gone[0] == 404 and "cannot be found" in gone[1]
    wait_freed(serving)
    # loaded again under another name: the same answer
    assert http(f"{url}/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(root / "lora-a")})[0] == 200
    assert greedy(url, "again", ids) == (200, text)


def wait_freed(serving):
    import time

    deadline = time.monotonic() + 30
    while serving.adapters.live_versions and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving.adapters.live_versions == 0, "the unloaded adapter's slot was not freed"


def bad_dirs(root, good, outside):
    """{what: (path, expected status, words the message must hold)}"""
    from safetensors.torch import load_file, save_file

    (root / "empty").mkdir()
    shutil.copytree(good, root / "shapes")
    state = load_file(good / "adapter_model.safetensors")
    # rank 1 where the config says 4: copy_ would broadcast it silently
    save_file({k: v[:1] if "lora_A" in k else v for k, v in state.items()}, root / "shapes" / "adapter_model.safetensors")
    shutil.copytree(good, root / "other-base")
    other = outside / "other-model"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    cfg = json.loads((good / "adapter_config.json").read_text())
    (root / "other-base" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(other)}))
    shutil.copytree(good, root / "targets")
    (root / "targets" / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["no_such_proj"]}))
    shutil.copytree(good, outside / "elsewhere")
    (root / "link").symlink_to(outside / "elsewhere")
    return {
        "no config": (root / "empty", 400, "not an adapter directory"),
        "wrong shapes": (root / "shapes", 400, "has shape"),
        "wrong base": (root / "other-base", 400, "trained on base model"),
        "unknown targets": (root / "targets", 400, "no_such_proj"),
        "missing": (root / "nothing-here", 404, "No adapter found"),
        "outside": (outside / "elsewhere", 403, "outside the directories"),
        "dot-dot": (root / ".." / "outside" / "elsewhere", 403, "outside the directories"),
        "symlink out": (root / "link", 403, "outside the directories"),
    }


def test_bad_directories_are_refused_and_lose_nothing(loading_server, trained_adapters, tmp_path):
    url, serving, root = loading_server
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copytree(trained_adapters["lora-b"], root / "good")
    assert http(f"{url}/v1/load_lora_adapter", {"lora_name": "good", "lora_path": str(root / "good")})[0] == 200
    ids = serving.engine.tokenizer("upper: hello\n")["input_ids"]
    before = greedy(url, "good", ids)
    slots = dict(serving.adapters.backbone.adapters)
    for what, (path, status, words) in bad_dirs(root, trained_adapters["lora-a"], outside).items():
        got = http(f"{url}/v1/load_lora_adapter", {"lora_name": what, "lora_path": str(path)})
        assert got[0] == status and words in json.loads(got[1])["error"]["message"], (what, got)
        assert what not in [m["id"] for m in json.loads(http(f"{url}/v1/models")[1])["data"]]
    assert serving.adapters.backbone.adapters == slots, "a failed load left a slot attached"
    assert greedy(url, "good", ids) == before


@pytest.mark.parametrize("flags, words", [
    (dict(enable_lora_loading=True, base_model="builtin:tiny-llama"), "needs at least one --lora-root"),
    (dict(lora_root=["/tmp"], adapters=["x"]), "--lora-root is for --enable-lora-loading"),
    (dict(), "no adapters to serve"),
    # loaded adapters would answer every tenant's token alike: refused where tokens are in force
    (dict(enable_lora_loading=True, lora_root=["/tmp"], base_model="builtin:tiny-llama", serve_tokens="/tmp/t.json"),
     "cannot be combined with --serve-tokens"),
])
def test_the_command_refuses_incomplete_flags_before_loading_anything(flags, words, capsys):
    from muxtune.engine.serve.serve_cli import serve_from_cli
    from muxtune.runconfig import ServeConfig

    assert serve_from_cli(ServeConfig(**flags)) == 2
    assert words in capsys.readouterr().err
