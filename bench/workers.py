"""The systems, each run in its own process by bench.multitask (`--worker SPEC.json`).

- separate / sequential: a plain Hugging Face + PEFT loop, as a user writes it: the model from
  from_pretrained (sdpa attention), one LoRA adapter from peft.get_peft_model, torch AdamW,
  dynamic padding to the longest sequence of each batch, labels with -100, loss from the model.
- separate-packed / sequential-packed: the same loop as a knowledgeable user runs it: padding-free
  batches from transformers' DataCollatorWithFlattening (one row per step, positions restarting
  per sequence, flash-attention boundary kwargs) and per-sequence attention. Which kernel: the
  engine's own varlen function, registered with transformers' AttentionInterface exactly as a user
  registers flash-attn (torch's varlen flash attention on CUDA, per-sequence SDPA on CPU), so the
  baseline attends exactly as muxtune does and only the multiplexing differs.
- muxtune: the engine's MuxTrainer over one MultiplexedBackbone, all tasks at once.

A worker writes one JSON result: per repeat, per task, the real and computed tokens and the
completion time; and its peak memory. Setup (model load, tokenising, adapter and optimizer
creation) is outside the timed region in every system; saving the trained adapter is inside.
"""
from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import psutil

from bench.workload import Job, lora_params, model_dims, timed_examples, TARGET_MODULES


def _rss() -> int:
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class Sync:
    """File barrier with the parent: 'ready-REP-WORKER' out, 'go-REP' (holding the parent's
    time.time() at release) in. Lets N separate processes start their timed region together."""

    def __init__(self, directory: str | None, worker: int):
        self.dir = Path(directory) if directory else None
        self.worker = worker

    def wait(self, rep: int) -> float:
        if self.dir is None:
            return time.time()
        (self.dir / f"ready-{rep}-{self.worker}").touch()
        go = self.dir / f"go-{rep}"
        while not go.exists():
            time.sleep(0.002)
        return float(go.read_text())


def _sync_device(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the Hugging Face + PEFT baseline -------------------------------------------------------
def hf_examples(tokenizer, job: Job) -> list[tuple[list[int], list[int]]]:
    """<s> prompt completion </s>, truncated to maxSeqLen; labels are the completion tokens
    (the model shifts them), -100 elsewhere."""
    out = []
    with open(job.data) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            p = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
            ids = ([tokenizer.bos_token_id] + p + c + [tokenizer.eos_token_id])[: job.max_seq_len]
            start = 1 + len(p)
            out.append((ids, [-100] * min(start, len(ids)) + ids[start:]))
    return out


def collate(batch, pad_id: int, device):
    """Dynamic padding: right-pad to the batch's longest sequence (what DataCollatorForSeq2Seq does)."""
    import torch

    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    real = sum(len(x) for x, _ in batch)
    return ids.to(device), mask.to(device), labels.to(device), real, len(batch) * width


def collate_flat(batch, device) -> tuple[dict, int, int]:
    """Padding-free: transformers' DataCollatorWithFlattening, with the flash-attention kwargs."""
    from transformers import DataCollatorWithFlattening

    flat = DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": x, "labels": y} for x, y in batch])
    real = sum(len(x) for x, _ in batch)
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in flat.items()}, real, real


class HFJob:
    """One task trained the standard way on a shared base model object (adapter injected, then unloaded)."""

    def __init__(self, job: Job, tokenizer, device, packed: bool = False):
        self.job, self.device, self.packed = job, device, packed
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.examples = hf_examples(tokenizer, job)

    def setup(self, base):
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(self.job.seed)
        cfg = LoraConfig(r=self.job.rank, lora_alpha=self.job.alpha, lora_dropout=0.0, bias="none",
                         target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
        self.model = get_peft_model(base, cfg)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=self.job.lr, weight_decay=0.0)

    def train(self, steps: int, save_to: Path | None) -> dict:
        import torch

        b, n = self.job.batch_size, len(self.examples)
        losses, real, computed, attn_needed, attn_computed = [], 0, 0, 0, 0
        for s in range(steps):
            batch = [self.examples[k % n] for k in range(s * b, (s + 1) * b)]
            needed = sum(len(x) * (len(x) + 1) // 2 for x, _ in batch)  # causal pairs within each sequence
            if self.packed:
                inputs, r, c = collate_flat(batch, self.device)
                pairs = needed
            else:
                ids, mask, labels, r, c = collate(batch, self.pad_id, self.device)
                inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
                pairs = ids.shape[0] * ids.shape[1] ** 2  # sdpa under a padding mask computes the whole square
            attn_needed, attn_computed = attn_needed + needed, attn_computed + pairs
            out = self.model(**inputs)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(out.loss.item())  # logged every step, as a training loop does
            real, computed = real + r, computed + c
        if save_to is not None:
            self.model.save_pretrained(save_to)
        _sync_device(self.device)
        return {"real_tokens": real, "computed_tokens": computed, "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None, "attn_needed": attn_needed, "attn_computed": attn_computed}

    def teardown(self):
        base = self.model.unload()  # the base model, LoRA layers removed
        del self.model, self.params, self.opt
        return base


def _hf_base(spec: dict, device, dtype, packed: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    attn = "sdpa"
    if packed:
        from muxtune.engine.model import attention
        attention.register()  # as a user registers a varlen kernel with AttentionInterface
        attn = attention.NAME
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, attn_implementation=attn).to(device)
    model.requires_grad_(False)
    return model, AutoTokenizer.from_pretrained(spec["model"])


def run_baseline(spec: dict, device, dtype, sync: Sync) -> dict:
    """separate[-packed] (one job, synchronised start with its siblings) or sequential[-packed]
    (all jobs, in order)."""
    jobs = [Job.from_dict(j) for j in spec["jobs"]]
    packed = spec["role"].endswith("-packed")
    base, tokenizer = _hf_base(spec, device, dtype, packed)
    dims = model_dims(base)
    runners = [HFJob(j, tokenizer, device, packed) for j in jobs]
    out_dir = Path(spec["out_dir"])
    # warm-up on a throwaway adapter (allocator, kernels, thread pools), once per process
    if jobs[0].warmup_steps:
        runners[0].setup(base)
        runners[0].train(jobs[0].warmup_steps, None)
        base = runners[0].teardown()
    reps = []
    for rep in range(spec["repeats"]):
        tasks, clock = {}, 0.0
        if spec["role"].startswith("separate"):
            runner = runners[0]
            runner.setup(base)
            go = sync.wait(rep)
            c0 = time.process_time()
            stats = runner.train(runner.job.steps, out_dir / f"rep{rep}" / runner.job.name)
            end, cpu = time.time(), time.process_time() - c0
            base = runner.teardown()
            tasks[runner.job.name] = {**stats, "completion_s": end - go}
            reps.append({"go_time": go, "end_time": end, "wall_s": end - go, "cpu_s": cpu, "tasks": tasks})
            continue
        cpu = 0.0
        for runner in runners:  # sequential: one after another; setup between jobs is not timed
            runner.setup(base)
            _sync_device(device)
            t0, c0 = time.perf_counter(), time.process_time()
            stats = runner.train(runner.job.steps, out_dir / f"rep{rep}" / runner.job.name)
            clock += time.perf_counter() - t0
            cpu += time.process_time() - c0
            base = runner.teardown()
            tasks[runner.job.name] = {**stats, "completion_s": clock}
        reps.append({"wall_s": clock, "cpu_s": cpu, "tasks": tasks})
    info = {j.name: {"lengths": [len(r.examples[k][0]) for k in timed_examples(j, j.steps)],
                     "trainable": lora_params(base, j.rank), "rank": j.rank} for j, r in zip(jobs, runners)}
    return {"dims": dims, "reps": reps, "tasks": info}


# ----- muxtune ---------------------------------------------------------------------------------
def data_root(jobs: list[Job]) -> Path:
    """The directory the jobs' data files share: the engine's data root (task paths are relative)."""
    roots = {Path(j.data).parent for j in jobs}
    if len(roots) != 1:
        raise ValueError(f"the jobs' data files are in {len(roots)} directories; the engine reads from one data root")
    return roots.pop()


def _task(job: Job, steps: int, model_path: str):
    from muxtune.api.finetunetask import FineTuneTask

    return FineTuneTask.model_validate({
        "apiVersion": "muxtune.io/v1alpha1", "kind": "FineTuneTask", "metadata": {"name": job.name},
        "spec": {
            "baseModel": model_path,
            "dataset": {"path": Path(job.data).name, "maxSeqLen": job.max_seq_len, "shuffle": False},
            "peft": {"method": "lora", "r": job.rank, "alpha": job.alpha, "dropout": 0.0,
                     "targetModules": TARGET_MODULES},
            "training": {"maxSteps": steps, "batchSize": job.batch_size, "learningRate": job.lr,
                         "seed": job.seed, "maxGradNorm": 1.0, "checkpointInterval": 0},
        },
    })


def run_muxtune(spec: dict, device, dtype, sync: Sync) -> dict:
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import load_backbone
    from muxtune.engine.task import SUCCEEDED
    from muxtune.engine.observe.telemetry import Telemetry
    from muxtune.engine.trainer import MuxTrainer

    class Rounds(Telemetry):
        def __init__(self):
            self.real = self.computed = self.count = self.attn_needed = self.attn_computed = 0
            self.tasks_per_round: list[int] = []

        def round_done(self, record):
            self.real += record.real_tokens
            self.computed += record.computed_tokens
            self.attn_needed += record.attention_pairs_needed
            self.attn_computed += record.attention_pairs_computed
            self.count += 1
            self.tasks_per_round.append(len(record.fused))

    jobs = [Job.from_dict(j) for j in spec["jobs"]]
    backbone = MultiplexedBackbone(load_backbone(Path(spec["model"]), device, dtype))
    from muxtune.engine.peft import lora_kernel
    lora_kernel.install(backbone.ctx, device)  # as `muxtune run` does: fused on CUDA, the loop on CPU
    dims = model_dims(backbone.model)  # before any task attaches
    out_dir = Path(spec["out_dir"])

    def trainer(name: str, steps_of) -> MuxTrainer:
        tr = MuxTrainer(backbone, out_dir / name, token_budget=spec["token_budget"], base_dir=data_root(jobs),
                        chunk_size=spec["chunk_size"], resume=False)
        for job in jobs:
            if steps_of(job):
                tr.add_task(_task(job, steps_of(job), spec["model"]))
        return tr

    if any(j.warmup_steps for j in jobs):
        trainer("warmup", lambda j: j.warmup_steps).run()
    reps = []
    for rep in range(spec["repeats"]):
        tr = trainer(f"rep{rep}", lambda j: j.steps)
        rounds, done, first = Rounds(), {}, {}
        tr.telemetry = rounds
        clock = {}

        def hook(t, rt):
            if rt.step == 1:
                first[rt.name] = rt.last_loss
            if rt.step >= rt.max_steps:
                done[rt.name] = time.perf_counter() - clock["t0"]

        tr.step_hooks.append(hook)
        sync.wait(rep)
        _sync_device(device)
        c0 = time.process_time()
        clock["t0"] = time.perf_counter()
        tr.run()
        _sync_device(device)
        wall = time.perf_counter() - clock["t0"]
        cpu = time.process_time() - c0
        bad = [f"{rt.name}: {rt.phase} {rt.message}" for rt in tr.tasks.values() if rt.phase != SUCCEEDED]
        if bad:
            raise RuntimeError("muxtune tasks did not succeed: " + "; ".join(bad))
        tasks = {rt.name: {"real_tokens": rt.tokens_total, "completion_s": done[rt.name], "first_loss": first.get(rt.name),
                           "last_loss": rt.last_loss} for rt in tr.tasks.values()}
        reps.append({"wall_s": wall, "cpu_s": cpu, "tasks": tasks, "real_tokens": rounds.real, "computed_tokens": rounds.computed,
                     "attn_needed": rounds.attn_needed, "attn_computed": rounds.attn_computed,
                     "rounds": rounds.count, "mean_tasks_per_round": sum(rounds.tasks_per_round) / max(1, rounds.count)})
        info = {}
        for job in jobs:
            rt = tr.tasks[f"default/{job.name}"]
            info[job.name] = {"lengths": [len(rt.stream.examples[k].input_ids) for k in timed_examples(job, job.steps)],
                              "trainable": sum(p.numel() for p in rt.adapter.parameters()), "rank": job.rank}
        del tr
    return {"dims": dims, "reps": reps, "tasks": info}


# ----- entry -----------------------------------------------------------------------------------
def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import peft  # noqa: F401 - both systems use these; load them before measuring the runtime
    import torch
    import transformers  # noqa: F401

    runtime_rss = _rss()  # interpreter + torch/transformers/peft, before any model: every process pays it
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[spec["dtype"]]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sync = Sync(spec.get("sync_dir"), spec["worker"])
    run = run_muxtune if spec["role"] == "muxtune" else run_baseline
    result = run(spec, device, dtype, sync)
    result.update(
        role=spec["role"], worker=spec["worker"], threads=torch.get_num_threads(), pid=os.getpid(),
        runtime_rss_bytes=runtime_rss, peak_rss_bytes=_peak_rss(),
        cuda_peak_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    )
    tmp = Path(spec["result"]).with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, spec["result"])
