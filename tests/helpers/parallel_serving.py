"""Serving tests' references and clients: a random PEFT LoRA adapter, what PEFT generates and the
logprobs it gives, and `muxtune serve` / `muxtune run --serve-port` started as a user starts them
(a subprocess, several ranks under --tp/--pp), reached over HTTP."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

from tests.helpers.parallel_runs import env

SERVING_LINE = re.compile(r"serving the OpenAI API on (http://\S+)/v1")


def random_lora(base_dir, out_dir, targets) -> None:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved the user's way."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        peft_model = get_peft_model(model, config)
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.data.normal_(0, 0.3)  # large enough that the adapter changes the greedy tokens
    peft_model.save_pretrained(out_dir)


def random_prompt_tuning(base_dir, out_dir, virtual_tokens: int = 5) -> None:
    """A PEFT prompt-tuning adapter with random (large) virtual token embeddings, saved the user's way."""
    from peft import PromptTuningConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=virtual_tokens)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        peft_model = get_peft_model(model, config)
        for name, p in peft_model.named_parameters():
            if "prompt_encoder" in name:
                p.data.normal_(0, 1.0)  # large enough that the virtual tokens change the greedy tokens
    peft_model.save_pretrained(out_dir)


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    base.generation_config.eos_token_id = None  # through EOS, as the server's ignore_eos
    return (PeftModel.from_pretrained(base, adapter_dir) if adapter_dir else base).eval()


def peft_generate(base_dir, adapter_dir, prompt: list[int], new: int) -> list[int]:
    out = peft_model(base_dir, adapter_dir).generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new,
                                                     pad_token_id=0)
    return out[0, len(prompt):].tolist()


def peft_logprobs(base_dir, adapter_dir, prompt: list[int], tokens: list[int]) -> list[float]:
    """log p(tokens[i] | prompt + tokens[:i]) from PEFT's own forward (fp32)."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(peft_model(base_dir, adapter_dir)(ids).logits[0].float(), -1)
    return [logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(tokens)]


class Server:
    """A `muxtune serve|run ...` subprocess; its API's base URL once it prints it; stopped with SIGTERM."""

    def __init__(self, args: list[str], cwd: Path, startup_s: float = 120):
        self.proc = subprocess.Popen([sys.executable, "-m", "muxtune.cli", *args], cwd=cwd, env=env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.url: str | None = None
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(startup_s) or self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + self.output)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if (m := SERVING_LINE.search(line)) and self.url is None:
                self.url = m.group(1)
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def complete(self, model: str, prompt: list[int], max_tokens: int, **extra) -> dict:
        body = dict(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, **extra)
        req = urllib.request.Request(f"{self.url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the server did not stop on SIGTERM:\n" + self.output) from None


def wait_for(cond, timeout: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
