"""lm-evaluation-harness scores an adapter through `muxtune serve`'s OpenAI API exactly as through its
own `hf` model with `peft=` on the same adapter directory: a loglikelihood (multiple choice) task and
a generation task, written here as local YAML tasks over local JSONL data, with the stock
`local-completions` model (token-id prompts, lm-eval's default) and `local-chat-completions`."""
from __future__ import annotations

import json
import random
import shutil

import pytest

pytestmark = pytest.mark.slow

TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the chat path renders what hf renders


def write_tasks(root, n=6):
    rng = random.Random(5)
    mc, gen = [], []
    for _ in range(n):
        w = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
        wrong = ["".join(rng.sample(w, len(w))) for _ in range(3)]
        choices = [w[::-1], *wrong]
        rng.shuffle(choices)
        mc.append({"question": f"reverse: {w}\n", "choices": choices, "answer": choices.index(w[::-1])})
        gen.append({"question": f"reverse: {w}\n", "answer": w[::-1]})
    for name, rows in (("mc", mc), ("gen", gen)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/%s.jsonl\n"
              "test_split: test\ndoc_to_text: '{{question}}'\n")
    (root / "mux_mc.yaml").write_text(
        "task: mux_mc\n" + common % "mc" + "output_type: multiple_choice\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "mux_gen.yaml").write_text(
        "task: mux_gen\n" + common % "gen" + "output_type: generate_until\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  do_sample: false\n  max_gen_toks: 10\n"
        "metric_list:\n  - metric: exact_match\n")
    return root


def evaluate(model, model_args, tasks, root, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, log_samples=True,
                                  task_manager=TaskManager(include_path=str(root), include_defaults=False), **kw)
    scores = {t: {k: v for k, v in r.items() if k.endswith(",none") and "stderr" not in k}
              for t, r in out["results"].items()}
    return scores, out["samples"]


def loglikelihoods(samples):
    return [float(resp[0][0]) for s in samples["mux_mc"] for resp in s["resps"]]


def test_lm_eval_api_models_score_as_hf_peft(tmp_path, http_stack, trained_adapters, tiny_backbone_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = write_tasks(tmp_path)
    base = shutil.copytree(tiny_backbone_dir, tmp_path / "base")  # hf's copy, with the chat template
    (base / "chat_template.jinja").write_text(TEMPLATE)
    (tmp_path / "template.jinja").write_text(TEMPLATE)
    url, _ = http_stack(chat_template=tmp_path / "template.jinja", max_model_len=256)
    adapter = trained_adapters["lora-a"]

    ref, ref_samples = evaluate("hf", f"pretrained={base},peft={adapter},dtype=float32,device=cpu,batch_size=4",
                                ["mux_mc", "mux_gen"], root)
    api, api_samples = evaluate("local-completions", f"model=lora-a,base_url={url}/v1/completions,tokenizer={base},"
                                f"max_retries=1,batch_size=4", ["mux_mc", "mux_gen"], root)
    assert api == ref, (api, ref)
    diffs = [abs(a - b) for a, b in zip(loglikelihoods(api_samples), loglikelihoods(ref_samples))]
    assert len(diffs) == 24 and max(diffs) < 1e-4, max(diffs)
    assert [s["resps"] for s in api_samples["mux_gen"]] == [s["resps"] for s in ref_samples["mux_gen"]]
    print("lm-eval local-completions == hf+peft:", api, "max loglikelihood |diff|", max(diffs))

    ref_chat, _ = evaluate("hf", f"pretrained={base},peft={adapter},dtype=float32,device=cpu", ["mux_gen"], root,
                           apply_chat_template=True)
    chat, _ = evaluate("local-chat-completions", f"model=lora-a,base_url={url}/v1/chat/completions,max_retries=1",
                       ["mux_gen"], root, apply_chat_template=True)
    assert chat == ref_chat, (chat, ref_chat)
    print("lm-eval local-chat-completions == hf+peft (chat template):", chat)
