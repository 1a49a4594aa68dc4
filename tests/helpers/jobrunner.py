"""Run a transfer Job's container on this host, as the operator e2e tests run engine pods: the
pod's own argv and environment, its Secret (envFrom) as environment, and host directories in
place of its volume mounts. Returns (exit code, output, termination message)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_job(job: dict, mounts: dict[str, Path], secrets: dict[str, dict[str, str]], tmp: Path,
            timeout: float = 300) -> tuple[int, str, str]:
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["muxtune"]

    def host(value: str) -> str:
        for prefix, target in sorted(mounts.items(), key=lambda kv: -len(kv[0])):
            if value == prefix or value.startswith(prefix + "/"):
                return str(target) + value[len(prefix):]
        return value

    for m in c["volumeMounts"]:
        assert m["mountPath"] in mounts, f"no host directory for mount {m['mountPath']}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_", "MUXTUNE_"))}
    env.update({e["name"]: host(e["value"]) for e in c.get("env", []) if "value" in e})
    for ref in c.get("envFrom", []):
        env.update(secrets[ref["secretRef"]["name"]])
    term = tmp / f"termination-{job['metadata']['name']}"
    env["MUXTUNE_TERMINATION_LOG"] = str(term)
    p = subprocess.run([sys.executable, "-m", "muxtune.cli", *[host(a) for a in c["args"]]], env=env,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout + p.stderr, term.read_text() if term.exists() else ""
