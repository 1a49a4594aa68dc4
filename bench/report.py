"""The benchmark's rows compared: ratios to every baseline, the same-workload check, the table."""
from __future__ import annotations

SYSTEMS = ("separate", "sequential", "separate-packed", "sequential-packed", "muxtune")
BASELINES = SYSTEMS[:-1]
SHORT = {"separate": "sep", "sequential": "seq", "separate-packed": "sep-p", "sequential-packed": "seq-p"}


def ratio_key(kind: str, baseline: str) -> str:
    """'speedup' / 'memory' vs a baseline: speedup_vs_separate_packed, memory_vs_sequential, ..."""
    return f"{kind}_vs_{baseline.replace('-', '_')}"


def add_ratios(rows: list[dict]) -> None:
    by = {(r["system"], r["n_tasks"]): r for r in rows}
    for r in rows:
        for ref in BASELINES:
            other = by.get((ref, r["n_tasks"]))
            r[ratio_key("speedup", ref)] = r["tokens_per_s"] / other["tokens_per_s"] if other else None
            r[ratio_key("memory", ref)] = r["peak_memory_bytes"] / other["peak_memory_bytes"] if other else None


def check_consistency(rows: list[dict]) -> list[str]:
    """The same workload in every system: same real tokens per task, same first-step loss
    (LoRA B starts at zero, so step 1 is the frozen model's loss on the same batch)."""
    problems = []
    for n in sorted({r["n_tasks"] for r in rows}):
        group = [r for r in rows if r["n_tasks"] == n]
        tokens = {r["system"]: r["task_real_tokens"] for r in group}
        if len({tuple(v) for v in tokens.values()}) > 1:
            problems.append(f"N={n}: real tokens per task differ between systems: {tokens}")
        ref = group[0]
        for r in group[1:]:
            for a, b in zip(ref["task_first_loss"], r["task_first_loss"]):
                if a is not None and b is not None and abs(a - b) > 2e-2 * max(1.0, abs(a)):
                    problems.append(f"N={n}: first-step loss {r['system']} {b:.4f} != {ref['system']} {a:.4f}")
                    break
    return problems


def mib(b) -> str:
    return f"{b / 2**20:,.0f} MiB" if b < 10 * 2**30 else f"{b / 2**30:,.1f} GiB"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def render(rows: list[dict], args, setup: dict) -> str:
    cpu = setup["device"] == "cpu"
    cores = f", {setup['cores']} cores" if cpu else ""
    if args is None:  # re-rendered from a JSON file
        lines = [f"model {rows[0]['model']}, {setup['dtype']}, {setup['device_name']}{cores}"]
    else:
        chunk = "" if args.chunk_size is None else f", chunk {args.chunk_size}"
        rounds = getattr(args, "rounds", 1)
        lines = [(f"model {args.model}, {setup['dtype']}, {setup['device_name']}{cores}; per task: {args.steps} timed steps"
                  f" x batch {args.batch_size} (+{args.warmup_steps} warm-up), lengths lognormal(median {args.median_len:g},"
                  f" sigma {args.sigma:g}) <= {args.max_seq_len}, ranks {','.join(map(str, args.ranks))};"
                  f" muxtune token budget {args.token_budget}{chunk}; median of {args.repeats} repeat(s)"
                  + (f" x {rounds} alternating rounds" if rounds > 1 else ""))]
    if cpu and args is not None:
        lines.append(f"separate*: N processes x max(1, {setup['cores']} // N) torch threads; sequential*, muxtune: one process"
                     f" x {args.threads or setup['cores']} threads; *-packed: padding-free rows, per-sequence attention")

    present = [b for b in BASELINES if any(r["system"] == b for r in rows)]
    cols = f"{'N':>3}  {'system':<17} {'tokens/s':>10}" + "".join(f" {'x ' + SHORT[b]:>7}" for b in present)
    cols += f" {'peak mem':>11}" + "".join(f" {'m/' + SHORT[b]:>7}" for b in present if b.startswith("separate"))
    cols += f" {'eff.tok':>7} {'attn':>5} {'tok/cpu-s':>9}  {'done (s) first-last':>20}"
    if not cpu:
        cols += f" {'MFU':>6}"
    lines += ["", cols, "-" * len(cols)]
    for n in sorted({r["n_tasks"] for r in rows}):
        for system in SYSTEMS:
            r = next((r for r in rows if r["n_tasks"] == n and r["system"] == system), None)
            if r is None:
                continue
            done = r["task_completion_s"]
            attn = r.get("attention_work_ratio")
            line = f"{n:>3}  {system:<17} {r['tokens_per_s']:>10,.0f}"
            line += "".join(f" {_x(r.get(ratio_key('speedup', b))):>7}" for b in present)
            line += f" {mib(r['peak_memory_bytes']):>11}"
            line += "".join(f" {_x(r.get(ratio_key('memory', b))):>7}" for b in present if b.startswith("separate"))
            per_cpu = r.get("tokens_per_cpu_s")
            line += f" {r['effective_token_ratio']:>7.3f} {'-' if attn is None else f'{attn:.2f}':>5}"
            line += f" {'-' if per_cpu is None else f'{per_cpu:,.0f}':>9}"
            line += f"  {f'{min(done):.2f}-{max(done):.2f}':>20}"
            if not cpu:
                mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                line += f" {mfu:>6}"
            lines.append(line)
        lines.append("")
    busy = max((r.get("background_cores") or 0.0) for r in rows) if rows else 0.0
    if cpu and busy > 0.25:
        lines.append(f"WARNING: other processes kept up to {busy:.1f} of {setup['cores']} cores busy during these runs: the"
                     " timings are unreliable, and a busy machine favours 'separate' (N processes get N shares of the CPU,"
                     " and a multi-threaded process stalls when one of its threads is descheduled). Try --wait-idle 600.")
    return "\n".join(lines)


def main(argv=None) -> int:
    """python -m bench.report ROWS.json: the table again, from a --json file."""
    import json
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m bench.report ROWS.json", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        rows = json.load(f)
    r0 = rows[0]
    setup = {"device": r0["device"], "dtype": r0["dtype"], "device_name": r0["device_name"], "cores": r0.get("cores", "?")}
    add_ratios(rows)
    print(render(rows, None, setup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
