"""Functions that run on every rank of a test group, started by torch's elastic launch (spawn pickles
them by module name, so they live in an importable module, not in a test file)."""
from __future__ import annotations

import os
from pathlib import Path


def start(world: int, fn, *args):
    """fn(*args) on `world` local ranks (gloo); each rank's return value, by rank."""
    from torch.distributed.launcher.api import elastic_launch

    from muxtune.engine.parallel.ranks import launch_config

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return elastic_launch(launch_config(world), fn)(*args)


def _trainer(out: Path, dp: int, pp: int, muxtune_home: str, base_dir: Path):
    import torch

    from muxtune.engine import parallel
    from muxtune.engine.model.backbone import MultiplexedBackbone
    from muxtune.engine.model.loading import builtin_path, load_backbone
    from muxtune.engine.parallel.dims import ParallelDims
    from muxtune.engine.parallel.group import DistGroup
    from muxtune.engine.parallel.ranks import init_distributed
    from muxtune.engine.trainer import MuxTrainer

    os.environ["MUXTUNE_HOME"] = muxtune_home
    path = builtin_path("tiny-llama")  # before the process group: see engine/run.py _prepare_models
    device = init_distributed(torch.device("cpu"))
    group = DistGroup(ParallelDims(dp, 1, pp, int(os.environ["WORLD_SIZE"])), device)
    backbone = MultiplexedBackbone(load_backbone(path, device, torch.float32))
    parallel.setup_backbone(backbone, group, device, announce=lambda _m: None)
    return MuxTrainer(backbone, out, group=group, base_dir=base_dir)


def faults(root: str, docs: list[dict], dp: int, pp: int, muxtune_home: str) -> dict:
    """Three tasks where only one rank sees each fault: 'sick' gets an inf weight on rank 0 after
    its 2nd step; 'broken' cannot read its data on the last rank only. Returns this rank's view."""
    import torch

    from muxtune.api.finetunetask import FineTuneTask
    from muxtune.engine import trainer as trainer_mod

    tr = _trainer(Path(root) / "out", dp, pp, muxtune_home, Path(root))
    rank, last = tr.group.rank, tr.group.world - 1
    real_load = trainer_mod.load_dataset

    def load(spec, *a, **k):
        if rank == last and "broken" in str(spec.path):
            raise OSError(f"rank {rank}: cannot read {spec.path}")
        return real_load(spec, *a, **k)

    trainer_mod.load_dataset = load

    def inject(t, rt):
        if rank == 0 and rt.name == "sick" and rt.step == 2:
            with torch.no_grad():
                next(iter(rt.adapter.parameters())).fill_(float("inf"))

    tr.step_hooks.append(inject)
    for doc in docs:
        tr.add_task(FineTuneTask.model_validate(doc))
    tr.run()
    return {rt.name: (rt.phase, rt.step, rt.message) for rt in tr.tasks.values()}


def exception_on_rank1(root: str, world_dp: int, muxtune_home: str) -> int:
    """`muxtune run --dp N` (the real run path) where rank 1's second round raises (a bug only that
    rank hits); every other rank runs unchanged. Returns this rank's exit code."""
    os.environ["MUXTUNE_HOME"] = muxtune_home
    from muxtune.cli import RunCommand
    from muxtune.engine import executor
    from muxtune.engine.run import run_from_cli

    if os.environ["RANK"] == "1":
        real, calls = executor.run_fused, []

        def boom(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("injected on rank 1")
            return real(*args, **kwargs)

        executor.run_fused = boom
    os.chdir(root)
    return run_from_cli(RunCommand(tasks=["tasks.yaml"], output=Path(root) / "out", progress=False, device="cpu",
                                   dp=world_dp))


def serve_greedy(base: str, adapter: str, tp: int, pp: int, cases: list, new: int, dp: int = 1) -> dict | None:
    """Serving over a group of dp x tp x pp ranks (engine/serve/distributed.py), driven on rank 0
    straight through its engine (no HTTP client): the cases [(model, prompt ids)] decoded greedily
    in one batch, with their logprobs, and the prompt logprobs of the first (echo). Rank 0 returns
    {"tokens", "logprobs", "prompt_logprobs", "iterations"}; the other ranks None."""
    import torch

    from muxtune.engine.parallel.dims import ParallelDims
    from muxtune.engine.parallel.group import DistGroup
    from muxtune.engine.parallel.ranks import init_distributed
    from muxtune.engine.runtime import load_multiplexed
    from muxtune.engine.serve.distributed import serve_in_group
    from muxtune.engine.serve.follower import Follower
    from muxtune.engine.serve.stack import Serving, limits_from
    from tests.helpers.serving import serve_flags, submit

    device = init_distributed(torch.device("cpu"))
    group = DistGroup(ParallelDims(dp, tp, pp, int(os.environ["WORLD_SIZE"])), device)
    backbone = load_multiplexed(Path(base), device, torch.float32, group, announce=lambda _m: None)
    flags = serve_flags(max_num_seqs=4, max_prefill_tokens=4, max_model_len=64)

    def lead(channel):
        serving = Serving(backbone, "base", flags, port=0, channel=channel)
        serving.adapters.add_directory("lora", Path(adapter))
        return serving

    serving = serve_in_group(group, lead, lambda ch: Follower(backbone, group, limits_from(flags), ch))
    if not group.is_writer:
        serving.loop.run(None)
        serving.close()
        group.close()
        return None
    reqs = [submit(serving.engine, model, ids, max_tokens=new, ignore_eos=True, logprobs=0,
                   **({"prompt_logprobs": 0} if i == 0 else {})) for i, (model, ids) in enumerate(cases)]
    while serving.engine.has_work():
        serving.loop.iteration()
    serving.loop.run(lambda: True)  # returns at once: the other ranks leave with it
    serving.close()
    group.close()
    out = {"tokens": [r.output_ids for r, _ in reqs], "logprobs": [], "prompt_logprobs": None,
           "iterations": serving.loop.iterations}
    for _, events in reqs:  # each Delta/Done event carries the logprobs of the tokens it sends
        out["logprobs"].append([e.logprob for ev in events for e in getattr(ev, "logprobs", None) or []])
    out["prompt_logprobs"] = [e.logprob for e in reqs[0][1][-1].prompt_logprobs]  # on the Done event
    return out
