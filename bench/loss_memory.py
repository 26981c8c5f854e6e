"""Memory and time of the FiRe-MPO loss: fused path vs naive path, at a real vocabulary size.

What is measured: one training step of the FiRe-MPO loss (4 branches: clean/corrupt x chosen/
rejected, span rewards, visual term, bidirectional span KL) from the policy's final hidden states
and the lm_head weight, forward + backward, float32 on CPU:

* naive: logits = h W^T for every branch ([B, T, V] each), then
  ``preference_loss_from_logits`` with the reference logits (also [B, T, V] per branch, built
  beforehand under no_grad, as that contract requires them);
* fused: ``preference_loss_from_hidden`` on the same hidden states, with the reference's per-branch
  log-prob sums precomputed (the per-round artifact) and the reference's hidden states at the
  span rows of (clean, y+).

Each path runs in a fresh subprocess. Peak memory is that process's ``ru_maxrss`` minus its RSS
once the shared inputs (lm_head weight, hidden states, labels) exist, with the high-water mark
reset at that point (``/proc/self/clear_refs``), so it is the extra memory the loss needs,
reference logits included for the naive path. Time is the median wall time of
``--repeats`` steps in that process. The lm_head is frozen by default (the paper's setting: LoRA on
the decoder only); ``--lm-head trained`` also takes the weight's gradient (fused path: logits are
recomputed per chunk in backward).

Run (17 min measured at the defaults on a shared 2-core machine, its floor being ~5 TFLOP per
step; ``--quick``, a 32k-vocabulary smoke run, took 2 min)::

    .venv/bin/python bench/loss_memory.py                      # V=151936, H=1024, 8 x 256 tokens
    .venv/bin/python bench/loss_memory.py --lm-head trained --repeats 1 --scaling ""
    .venv/bin/python bench/loss_memory.py --out /tmp/bench_loss_memory.md

``make bench`` (``bench/run_all.py``) runs the reduced setting, same vocabulary, a few minutes::

    .venv/bin/python bench/loss_memory.py --hidden 256 --seqs 4 --tokens 64 \
        --scaling 32,64,128,256 --json /tmp/loss.json

It prints a markdown section (headline table with fused/naive ratios from this one run, then the
fused peak at 128/256/512/1024 tokens per sequence) and writes it to ``--out`` if given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GB = 1024**3
MB = 1024**2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _reset_peak() -> bool:
    """Reset the process's RSS high-water mark (Linux >= 4.0), so that building the inputs does
    not count towards the peak; ru_maxrss then restarts from the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# worker: one path, one size, in its own process


def _inputs(args):
    import torch

    from fire_mpo_core.losses import BRANCHES

    torch.manual_seed(0)
    b, t, h, v = args.seqs, args.tokens, args.hidden, args.vocab
    weight = (torch.randn(v, h) * 0.02).requires_grad_(args.lm_head == "trained")
    hidden, ref_hidden, labels, spans = {}, {}, {}, {}
    pos = torch.arange(t)
    span_row = (pos % 32 >= 5) & (pos % 32 < 8)  # 3 span tokens every 32: ~9% of the response
    for k in BRANCHES:
        hidden[k] = torch.randn(b, t, h).requires_grad_(True)
        ref_hidden[k] = hidden[k].detach() + 0.1 * torch.randn(b, t, h)
        labels[k] = torch.randint(0, v, (b, t))  # every position is a response token
        spans[k] = span_row.expand(b, t).clone()
    has_corrupted = torch.ones(b, dtype=torch.bool)
    return weight, hidden, ref_hidden, labels, spans, has_corrupted


def _worker(args) -> dict:
    import torch

    from fire_mpo_core.losses import (
        BRANCHES,
        LossConfig,
        pack_branch,
        pack_rows,
        preference_loss_from_hidden,
        preference_loss_from_logits,
        reference_logp_sums,
    )

    torch.set_num_threads(args.threads)
    cfg = LossConfig(name="fire_mpo", chunk_size=args.chunk)
    weight, hidden, ref_hidden, labels, spans, hc = _inputs(args)
    params = [hidden[k] for k in BRANCHES] + ([weight] if weight.requires_grad else [])

    if args.worker == "fused":
        # Inputs of the fused API: the reference's per-branch sums (per-round artifact) and its
        # hidden states at the span rows of (clean, y+).
        ref_sums = {}
        for k in BRANCHES:
            rows, targets, pair = pack_rows(ref_hidden[k], labels[k])
            ref_sums[k] = reference_logp_sums(
                rows, targets, pair, spans[k].reshape(-1), args.seqs, weight, chunk_size=args.chunk
            )
        ref_kl = ref_hidden["clean_chosen"][spans["clean_chosen"]]
        del ref_hidden
        baseline = _rss_bytes()
        peak_reset = _reset_peak()
        extra_inputs = 0

        def step():
            # packing the response rows is part of the step: it is in the autograd graph
            branches = {
                k: pack_branch(hidden[k], labels[k], spans[k], *ref_sums[k]) for k in BRANCHES
            }
            loss = preference_loss_from_hidden(
                cfg, branches, weight, hc, reference_kl_hidden=ref_kl
            )
            loss.mean().backward()
            return loss

    else:
        baseline = _rss_bytes()
        peak_reset = _reset_peak()
        with torch.no_grad():  # the naive contract takes [B, T, V] reference logits
            ref_logits = {k: ref_hidden[k] @ weight.t() for k in BRANCHES}
        del ref_hidden
        extra_inputs = _rss_bytes() - baseline

        def step():
            logits = {k: hidden[k] @ weight.t() for k in BRANCHES}
            loss = preference_loss_from_logits(cfg, logits, ref_logits, labels, spans, hc)
            del logits  # a careful caller frees them before backward (autograd does not need them)
            loss.mean().backward()
            return loss

    times, cpu_times, loads = [], [], []
    for _ in range(args.repeats):
        for p in params:
            p.grad = None
        loads.append(os.getloadavg()[0])
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "path": args.worker,
        "tokens": args.tokens,
        "peak_extra_bytes": _maxrss_bytes() - baseline,
        "reference_input_bytes": extra_inputs,
        "peak_reset": peak_reset,
        "times_s": times,
        "cpu_times_s": cpu_times,
        "load_1min": loads,
        "loss": loss.detach().double().tolist(),
        "grad_norms": [p.grad.double().norm().item() for p in params],
    }


# --------------------------------------------------------------------------------------------
# driver


def _run(args, path: str, tokens: int, repeats: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker", path,
        "--tokens", str(tokens),
        "--repeats", str(repeats),
        "--vocab", str(args.vocab),
        "--hidden", str(args.hidden),
        "--seqs", str(args.seqs),
        "--chunk", str(args.chunk),
        "--threads", str(args.threads),
        "--lm-head", args.lm_head,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{path} @ {tokens} tokens failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"  {path:5s} T={tokens:5d}: peak +{result['peak_extra_bytes'] / GB:.2f} GiB, "
        f"times {', '.join(f'{x:.1f}' for x in result['times_s'])} s",
        file=sys.stderr,
        flush=True,
    )
    return result


def _merge(results: list[dict]) -> dict:
    """One path's runs as one result: the largest peak, every step's times and loads."""
    out = dict(results[0])
    out["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in results)
    for key in ("times_s", "cpu_times_s", "load_1min"):
        out[key] = [x for r in results for x in r[key]]
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _fmt_steps(r: dict) -> str:
    return ", ".join(
        f"{w:.1f} s ({c:.1f} s) [{ld:.1f}]"
        for w, c, ld in zip(r["times_s"], r["cpu_times_s"], r["load_1min"])
    )


def _report(args, naive: dict, fused: dict, scaling: list[dict], wall: float) -> str:
    import torch

    b, t, v = args.seqs, args.tokens, args.vocab
    logits_bytes = b * t * v * 4
    med = statistics.median
    tn, tf = med(naive["times_s"]), med(fused["times_s"])
    cn, cf = med(naive["cpu_times_s"]), med(fused["cpu_times_s"])
    pn, pf = naive["peak_extra_bytes"], fused["peak_extra_bytes"]
    loss_diff = max(abs(x - y) for x, y in zip(naive["loss"], fused["loss"]))
    grad_rel = max(
        abs(x - y) / max(abs(x), 1e-30) for x, y in zip(naive["grad_norms"], fused["grad_norms"])
    )
    grads_of = "hidden states" + (", lm_head" if args.lm_head == "trained" else "")
    lines = [
        "## Loss memory: fused vs naive FiRe-MPO loss",
        "",
        f"Measured by `bench/loss_memory.py` on {_cpu_name()}, {args.threads} threads, torch "
        f"{torch.__version__}, float32. One FiRe-MPO step (4 branches, forward + backward) from "
        f"hidden states: vocabulary {v:,}, hidden {args.hidden}, {b} sequences x {t} response "
        f"tokens per branch, ~9% span tokens, every pair with a corrupted image, lm_head "
        f"{args.lm_head}, fused chunk {args.chunk} rows. Every step ran in a fresh process, "
        "naive and fused alternating so both see the same background load; peak = ru_maxrss "
        "minus RSS after the shared inputs (high-water mark reset there"
        f"{'' if fused['peak_reset'] else ' -- reset unavailable, peaks include input building'}"
        f"), the largest over the steps; times are medians of {args.repeats} steps (wall; CPU = "
        "user + system time of the process, 2 threads, less sensitive to other load on the "
        f"machine). One [B, T, V] float32 logits tensor is {logits_bytes / GB:.2f} GiB.",
        "",
        "| path | peak extra memory | wall time / step | CPU time / step | steps: wall (CPU) "
        "[1-min load] |",
        "|---|---|---|---|---|",
        f"| naive (`preference_loss_from_logits`) | {pn / GB:.2f} GiB (incl. reference logits "
        f"{naive['reference_input_bytes'] / GB:.2f} GiB) | {tn:.1f} s | {cn:.1f} s "
        f"| {_fmt_steps(naive)} |",
        f"| fused (`preference_loss_from_hidden`) | {pf / GB:.2f} GiB | {tf:.1f} s | {cf:.1f} s "
        f"| {_fmt_steps(fused)} |",
        f"| **fused / naive** | **{pf / pn:.1%}** (goal <= 15%) | **{tf / tn:.2f}x** "
        f"(goal <= 1.3x) | **{cf / cn:.2f}x** | |",
        "",
        f"Agreement in this run (float32): max |loss difference| {loss_diff:.2e}; max relative "
        f"difference of gradient norms ({grads_of}) {grad_rel:.2e}.",
    ]
    if scaling:
        lines += [
            "",
            f"Fused peak vs response length ({b} sequences, same vocabulary; one step each):",
            "",
            "| tokens / sequence | rows per branch | fused peak extra "
            "| one [B, T, V] logits tensor | peak / logits tensor | wall time |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(scaling, key=lambda r: r["tokens"]):
            lt = b * r["tokens"] * v * 4
            lines.append(
                f"| {r['tokens']} | {b * r['tokens']:,} | {r['peak_extra_bytes'] / MB:,.0f} MiB "
                f"| {lt / MB:,.0f} MiB | {r['peak_extra_bytes'] / lt:.3f} "
                f"| {med(r['times_s']):.1f} s |"
            )
    lines += ["", f"Whole benchmark wall time: {wall / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--seqs", type=int, default=8, help="sequences (pairs) per batch")
    ap.add_argument("--tokens", type=int, default=256, help="response tokens per sequence")
    ap.add_argument("--chunk", type=int, default=256, help="fused path: rows per chunk")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per path (median)")
    ap.add_argument(
        "--scaling",
        default="128,256,512,1024",
        help="token counts for the fused peak sweep (comma-separated; '' to skip)",
    )
    ap.add_argument("--lm-head", choices=["frozen", "trained"], default="frozen")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, help="also write the markdown here")
    ap.add_argument("--json", type=Path, help="also write the raw results (JSON) here")
    ap.add_argument("--quick", action="store_true", help="smoke run: V=32000, sweep 128,256")
    ap.add_argument("--worker", choices=["naive", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.quick:
        args.vocab, args.scaling = 32_000, "128,256"
    start = time.perf_counter()
    print(f"naive and fused at {args.tokens} tokens ...", file=sys.stderr, flush=True)
    # One step per fresh process, alternating naive / fused, so that both paths see the same
    # background load on a shared machine.
    runs: dict[str, list[dict]] = {"naive": [], "fused": []}
    for _ in range(args.repeats):
        for path in ("naive", "fused"):
            runs[path].append(_run(args, path, args.tokens, 1))
    naive, fused = (_merge(runs[path]) for path in ("naive", "fused"))
    scaling = []
    for tok in (int(x) for x in args.scaling.split(",") if x.strip()):
        scaling.append(fused if tok == args.tokens else _run(args, "fused", tok, 1))
    text = _report(args, naive, fused, scaling, time.perf_counter() - start)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        raw = {"bench": "loss_memory", "args": {k: v for k, v in vars(args).items() if k != "out"}}
        raw.update(naive=naive, fused=fused, scaling=scaling, wall_s=time.perf_counter() - start)
        raw["args"]["json"] = str(args.json)
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
