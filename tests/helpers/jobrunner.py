"""Run a transfer Job's container on this host, as the operator e2e tests run engine pods: the
pod's own argv and environment, its Secret (envFrom) as environment, and host directories in
place of its volume mounts. Returns (exit code, output, termination message); run_and_report also
reports them on the Job's pod, the part of a kubelet's work a kwok node leaves out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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


def report_to_pod(info, job: dict, rc: int, message: str, timeout: float = 60) -> dict:
    """What a kubelet reports once the container exited: its exit code and termination message in
    the pod's status. A kwok node has already completed the pod (it runs nothing), so this lands
    on the finished pod: the operator reads a Job's outcome from this result (operator/transfers.py)."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    deadline = time.monotonic() + timeout
    while True:
        pods = json.loads(info.kubectl("get", "pods", "-n", ns, "-l", f"job-name={name}", "-o", "json").stdout)["items"]
        done = [p for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
        if done:
            break
        assert time.monotonic() < deadline, f"no finished pod of Job {ns}/{name}: {[p['metadata']['name'] for p in pods]}"
        time.sleep(0.3)
    pod = done[0]
    (c,) = pod["spec"]["containers"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    terminated = {"exitCode": rc, "reason": "Completed" if rc == 0 else "Error", "message": message,
                  "startedAt": now, "finishedAt": now}
    status = {"containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False,
                                     "restartCount": 0, "started": False, "state": {"terminated": terminated}}]}
    info.kubectl("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status", "--type=merge",
                 "-p", json.dumps({"status": status}))
    return pod


def run_and_report(info, job: dict, mounts: dict[str, Path], secrets: dict[str, dict[str, str]], tmp: Path,
                   ) -> tuple[int, str, str]:
    """run_job, then report its exit code and result on the Job's pod, as a kubelet would."""
    rc, out, term = run_job(job, mounts, secrets, tmp)
    report_to_pod(info, job, rc, term)
    return rc, out, term
