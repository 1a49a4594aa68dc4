"""Starting the benchmark's worker processes, synchronising them, and collecting their results.

Two launchers, the same measurement:
- exec: each worker is `python -m bench.multitask --worker SPEC` (a fresh interpreter).
- fork (the default on CPU): a zygote process imports torch, transformers, peft and the engine
  once, without running a single op, and forks each worker from that state. A worker is still a
  fresh process with its own memory accounting (its peak RSS starts from the imported runtime,
  as an exec'd process's does after its imports) but skips ~5 s of imports, which is most of a
  --quick run on 2 cores. Never used with CUDA (a CUDA context does not survive fork).
"""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class WorkerError(RuntimeError):
    pass


def _busy_cpu_s() -> float:
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def _own_cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_idle(max_wait: float, threshold: float = 0.25, window: float = 1.0) -> float:
    """Wait (up to max_wait seconds) for a window in which other processes keep fewer than
    `threshold` cores busy; returns the last window's figure. For shared machines."""
    deadline = time.monotonic() + max_wait
    while True:
        busy0, own0 = _busy_cpu_s(), _own_cpu_s()
        time.sleep(window)
        other = max(0.0, (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / window
        if other < threshold or time.monotonic() >= deadline:
            return other


def _thread_env(threads: int) -> dict:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


class Forked:
    """A forked worker with the slice of Popen's interface launch() uses."""

    def __init__(self, spec_path: Path, threads: int, log_path: Path):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.environ.update(_thread_env(threads))
                from bench.workers import main

                main(str(spec_path))
                code = 0
            except BaseException:  # noqa: BLE001 - report anything, then leave without cleanup
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.pid, self.returncode = pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


def launch(specs: list[dict], run_dir: Path, repeats: int, synchronised: bool, timeout: float,
           fork: bool = False) -> tuple[list[dict], float]:
    """Start one process per spec; release synchronised ones together for each repeat; collect results.
    Also returns how many cores other processes kept busy meanwhile (machine-wide busy CPU time
    minus this process's and its workers'), the sign of a shared machine whose timings mislead."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    busy0, own0, t0 = _busy_cpu_s(), _own_cpu_s(), time.monotonic()
    procs, logs = [], []
    try:
        for spec in specs:
            path = run_dir / f"spec-{spec['worker']}.json"
            path.write_text(json.dumps(spec, indent=1))
            log_path = run_dir / f"worker-{spec['worker']}.log"
            if fork:
                procs.append(Forked(path, spec["threads"], log_path))
                continue
            env = dict(os.environ, **_thread_env(spec["threads"]),
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            log = open(log_path, "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.multitask", "--worker", str(path)],
                                          cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout

        def check() -> None:
            for spec, proc in zip(specs, procs):
                if proc.poll() not in (None, 0):
                    raise WorkerError(_failure(spec, proc.returncode, run_dir))
            if time.monotonic() > deadline:
                raise WorkerError(f"timed out after {timeout:.0f}s (logs in {run_dir})")

        if synchronised:
            sync = Path(specs[0]["sync_dir"])
            for rep in range(repeats):
                while not all((sync / f"ready-{rep}-{s['worker']}").exists() for s in specs):
                    check()
                    time.sleep(0.005)
                tmp = sync / f".go-{rep}"
                tmp.write_text(repr(time.time()))
                os.replace(tmp, sync / f"go-{rep}")
        while any(p.poll() is None for p in procs):
            check()
            time.sleep(0.02)
        check()
    except BaseException:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        raise
    finally:
        for log in logs:
            log.close()
    background = max(0.0, (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0)) / max(1e-9, time.monotonic() - t0)
    return [json.loads(Path(s["result"]).read_text()) for s in specs], background


def _failure(spec: dict, rc: int, run_dir: Path) -> str:
    log = run_dir / f"worker-{spec['worker']}.log"
    tail = log.read_text()[-3000:] if log.exists() else ""
    return f"{spec['role']} worker {spec['worker']} exited with {rc}; log {log}:\n{tail}"


# ----- the zygote ------------------------------------------------------------------------------
def zygote_main() -> None:
    """Import everything a worker needs (no tensor op runs: no thread pool exists to break on
    fork), then serve launch requests, one JSON line in, one JSON line out."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    import peft  # noqa: F401
    import peft.tuners.lora  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import bench.workers  # noqa: F401
    import muxtune.engine.trainer  # noqa: F401

    del transformers
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        try:
            results, background = launch(req["specs"], Path(req["run_dir"]), req["repeats"], req["synchronised"],
                                         req["timeout"], fork=True)
            reply = {"results": results, "background": background}
        except WorkerError as exc:
            reply = {"error": str(exc)}
        proto.write(json.dumps(reply) + "\n")


class Zygote:
    """The parent's handle on a zygote process."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.multitask", "--zygote"], cwd=REPO, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))))
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"the zygote process exited ({self.proc.wait()}); see its stderr above")
        return json.loads(line)

    def launch(self, specs, run_dir: Path, repeats: int, synchronised: bool, timeout: float):
        self.proc.stdin.write(json.dumps({"specs": specs, "run_dir": str(run_dir), "repeats": repeats,
                                          "synchronised": synchronised, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise WorkerError(reply["error"])
        return reply["results"], reply["background"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
