"""The benchmark suite behind ``make bench``: run every benchmark, render ``BENCHMARKS.md``.

Each benchmark runs in a fresh subprocess and leaves a JSON result; this script collects them,
with the machine, library versions, the command, the date and the load before and after, and
renders ``BENCHMARKS.md`` (goal table first, then one section per benchmark, then the
measurements ``make bench`` does not regenerate, from ``bench/kept.md``).

    .venv/bin/python -m bench.run_all                 # what `make bench` runs (<= 20 min, 2 cores)
    .venv/bin/python -m bench.run_all --quick --out /tmp/BENCH.md    # smoke run, a few minutes
    .venv/bin/python -m bench.run_all --only trainer,loss            # a subset
    .venv/bin/python -m bench.run_all --render results.json          # re-render saved results

Benchmarks: ``trainer`` (ours vs TRL DPO, FiRe-MPO step), ``profile`` (where a step's time
goes, image encodes, reference forwards, length grouping), ``loss`` (fused vs naive at
V = 151,936, reduced size), ``stages`` (sampling, judge, corruption, evaluation), ``cycle``
(Prefect vs direct, cached rerun, scaling with data size). GPU: not measured unless a GPU is
present (none is on these machines).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, machine_info, versions
from bench.real_shape import goal_rows as real_goal_rows
from bench.real_shape import render_section as real_section

GIB, MIB = 1024**3, 1024**2
KEPT = Path(__file__).with_name("kept.md")

#: The loss benchmark at make-bench size: the real vocabulary, smaller hidden / batch.
LOSS_ARGS = ["--hidden", "256", "--seqs", "8", "--tokens", "64", "--repeats", "2"]
LOSS_ARGS += ["--scaling", "32,64,128,256"]
LOSS_QUICK = ["--vocab", "151936", "--hidden", "128", "--seqs", "2", "--tokens", "32"]
LOSS_QUICK += ["--repeats", "1", "--scaling", "32,64"]
#: The real-shape trainer benchmark at make-bench size (`make bench-real`: the full size).
REAL_ARGS = ["--hidden", "512", "--layers", "2", "--tokens", "64", "--batch", "4"]
REAL_ARGS += ["--steps", "3", "--repeats", "2"]


def commands(quick: bool, out_dir: Path) -> dict[str, list[str]]:
    """Benchmark name -> argv (after the interpreter) writing ``out_dir/<name>.json``."""
    q = ["--quick"] if quick else []
    return {
        "trainer": ["-m", "bench.trainer", *q, "--out", str(out_dir / "trainer.json")],
        "profile": ["-m", "bench.step_profile", *q, "--out", str(out_dir / "profile.json")],
        "loss": [
            str(ROOT / "bench" / "loss_memory.py"),
            *(LOSS_QUICK if quick else LOSS_ARGS),
            "--out",
            str(out_dir / "loss.md"),
            "--json",
            str(out_dir / "loss.json"),
        ],
        "stages": ["-m", "bench.stages", *q, "--out", str(out_dir / "stages.json")],
        "cycle": ["-m", "bench.cycle", *q, "--out", str(out_dir / "cycle.json")],
        "real_shape": [
            "-m",
            "bench.real_shape",
            *(["--quick"] if quick else REAL_ARGS),
            "--out",
            str(out_dir / "real_shape.json"),
        ],
    }


def run_benchmarks(names: list[str], quick: bool, out_dir: Path) -> dict[str, Any]:
    cmds = commands(quick, out_dir)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    results: dict[str, Any] = {}
    for name in names:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        done = subprocess.run(
            [sys.executable, *cmds[name]], cwd=ROOT, env=env, text=True, capture_output=True
        )
        seconds = time.perf_counter() - t0
        path = out_dir / f"{name}.json"
        if done.returncode != 0 or not path.is_file():
            results[name] = {"error": done.stderr[-3000:], "seconds": seconds}
            print(f"[bench] {name} FAILED after {seconds:.0f} s", file=sys.stderr, flush=True)
            continue
        results[name] = json.loads(path.read_text())
        results[name]["seconds"] = seconds
        if name == "loss":
            results[name]["markdown"] = (out_dir / "loss.md").read_text()
        print(f"[bench] {name} done in {seconds:.0f} s", file=sys.stderr, flush=True)
    return results


# --------------------------------------------------------------------------- rendering


def _ok(value: float | None, goal: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    met = value >= goal if higher_is_better else value <= goal
    return "met" if met else "**not met**"


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(what, measured, goal, verdict) rows from the results; missing figures say so."""
    rows: list[tuple[str, str, str, str]] = []

    def add(what: str, value: float, fmt: str, goal: float, higher: bool, unit: str = "x"):
        sign = ">=" if higher else "<="
        rows.append((what, fmt.format(value), f"{sign} {goal:g}{unit}", _ok(value, goal, higher)))

    tv = _get(results, "trainer", "variants", default={}) or {}
    ours, trl = tv.get("ours-dpo-artifact"), tv.get("trl-dpo")
    fire, inloop = tv.get("ours-fire_mpo-artifact"), tv.get("ours-dpo-inloop")
    if ours and trl:
        r = ours["pairs_per_s"] / trl["pairs_per_s"]
        add("DPO pairs/s, ours (reference artifact) / TRL", r, "{:.2f}x", 1.2, True)
        if inloop:
            r = inloop["pairs_per_s"] / trl["pairs_per_s"]
            add("DPO pairs/s, ours (reference in-loop, as TRL) / TRL", r, "{:.2f}x", 1.2, True)
        m = ours["step_peak_extra_bytes"] / max(1, trl["step_peak_extra_bytes"])
        add("DPO step peak memory (RSS above step 1), ours / TRL", m, "{:.2f}x", 1.0, False)
        m = ours["peak_rss_bytes"] / trl["peak_rss_bytes"]
        add("DPO process peak RSS, ours / TRL", m, "{:.2f}x", 1.0, False)
    elif "trainer" in results:
        rows.append(("ours vs TRL DPO", "not measured", ">= 1.2x", "see section 1"))
    if "real_shape" in results and "error" not in results["real_shape"]:
        rows += real_goal_rows(results["real_shape"])
    if fire and trl:
        r = fire["step_s"] / trl["step_s"]
        add("FiRe-MPO step (4 branches) / TRL DPO step (2), time", r, "{:.2f}x", 1.6, False)
    prof = _get(results, "profile", "profiles", "artifact")
    if prof:
        add(
            "image encodes per pair per step (FiRe-MPO)",
            prof["image_encodes_per_pair_step"],
            "{:.2f}",
            2,
            False,
            "",
        )
        lm = prof["lm_rows_per_forward"]
        rows.append(
            (
                "reference forwards per step (artifact)",
                f"{prof['reference_forwards_per_step']}, over {lm[-1]} of {lm[0]} rows",
                "<= 1, (v, y+) rows only",
                _ok(prof["reference_forwards_per_step"], 1, False),
            )
        )
    loss = results.get("loss")
    if loss and "naive" in loss:
        pm = loss["fused"]["peak_extra_bytes"] / loss["naive"]["peak_extra_bytes"]
        tm = _median(loss["fused"]["times_s"]) / _median(loss["naive"]["times_s"])
        add("fused / naive loss peak memory (V = 151,936)", pm, "{:.3f}x", 0.15, False)
        add("fused / naive loss time", tm, "{:.2f}x", 1.3, False)
    cyc = results.get("cycle")
    if cyc and "full" in cyc:
        direct = cyc["full"]["direct"]["process_s"]
        if "served" in cyc["full"]:
            r = cyc["full"]["served"]["process_s"] / direct
            add("full cycle, Prefect (running server) / direct calls", r, "{:.2f}x", 1.15, False)
        r = cyc["full"]["prefect"]["process_s"] / direct
        add("full cycle, Prefect (temporary API, `make run`) / direct", r, "{:.2f}x", 1.15, False)
        sc = cyc.get("scaling") or []
        if len(sc) >= 2:
            a, b = sc[0], sc[-1]
            lin = (b["round_s"] / a["round_s"]) / (b["factor"] / a["factor"])
            what = f"one round: time({b['factor']}x data) / ({b['factor']} x time(1x))"
            rows.append((what, f"{lin:.2f}", "~1 (linear)", "see section 4"))
    st = results.get("stages")
    if st and "sampling" in st:
        for t, v in st["sampling"]["temperatures"].items():
            r = v["batch_16"] / v["batch_1"]
            add(f"sampling batch 16 / batch 1 (temperature {t})", r, "{:.1f}x", 4, True)
        noise = st["corruption"]["images_per_s"].get("noise")
        add("corruption, lesion noise, 1 thread", noise, "{:,.0f}/s", 300, True, "/s")
    return rows


def _median(xs):
    import statistics

    return statistics.median(xs)


def _table(header: list[str], rows: list) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def _trainer_section(r: dict) -> list[str]:
    lines = ["## 1. Trainer vs TRL (`python -m bench.trainer`)", ""]
    if "error" in r:
        return [*lines, f"Failed: ```{r['error'][-800:]}```", ""]
    lines += [
        f"Tiny LLaVA of the embedded default (hidden 128, 2 layers, vocabulary 1024, 16 image "
        f"tokens), {r['pairs']} SynthLesion pairs with v', batch {r['batch']} pairs, "
        f"{r['steps']} optimizer steps, LoRA r 16 / alpha 32 / dropout 0.05 on the language "
        f"model's linear layers (the same {_first(r, 'trainable_parameters')} trainable "
        f"parameters), float32, AdamW 2e-3 cosine, no gradient checkpointing, {r['threads']} "
        f"torch thread. Each run a fresh process, variants alternated, medians of "
        f"{r['repeats']} runs; pairs/s over steps 2..N, step end to step end (collation in).",
        "",
    ]
    rows = []
    for name, v in r["variants"].items():
        rows.append(
            (
                name,
                f"{v['pairs_per_s']:.1f}",
                ", ".join(f"{x:.1f}" for x in v["pairs_per_s_runs"]),
                f"{v['step_s'] * 1000:.0f} ms",
                f"{v['step_peak_extra_bytes'] / MIB:.1f} MiB",
                f"{v['peak_rss_bytes'] / MIB:.0f} MiB",
                "-"
                if v.get("image_encodes_per_pair_step") is None
                else f"{v['image_encodes_per_pair_step']:.2f}",
                f"{v['final_loss']:.4f}" if v.get("final_loss") is not None else "-",
            )
        )
    lines += _table(
        [
            "variant",
            "pairs/s",
            "runs",
            "step",
            "step peak (RSS above step 1)",
            "process peak RSS",
            "image encodes / pair",
            "final loss",
        ],
        rows,
    )
    art = r["variants"].get("ours-dpo-artifact", {}).get("reference_artifact_s_per_pair")
    if art:
        lines += [
            "",
            f"The reference artifact costs {art * 1000:.1f} ms per pair once per round "
            "(computed before training, not in the pairs/s above; the in-loop row pays the "
            "reference in every step, as TRL does).",
        ]
    for name, err in r.get("errors", {}).items():
        lines += ["", f"{name} failed: ```{err[-600:]}```"]
    lines += [
        "",
        "What differs: TRL tokenises prompt and responses separately (our chat-template prompt "
        "string is given to it, with EOS appended to each response as our encoder does), pads "
        "left then flushes left, and scores responses with its own fused lm_head; it computes "
        "extra metrics (entropy, token accuracy) each step. Ours: one right-padded branch batch, "
        "each distinct image encoded once, reference sums from the per-round artifact (or in "
        "the step), chunked fused log-probs. LoRA init draws differ, so the losses differ "
        "slightly.",
        "",
    ]
    return lines


def _first(r: dict, key: str):
    for v in r.get("variants", {}).values():
        if v.get(key) is not None:
            return f"{v[key]:,}"
    return "?"


def _profile_section(r: dict) -> list[str]:
    lines = ["## 2. Where the time goes (`python -m bench.step_profile`)", ""]
    if "error" in r:
        return [*lines, f"Failed: ```{r['error'][-800:]}```", ""]
    lines += [
        f"One FiRe-MPO step (fused, 8 pairs, 4 branches) of the bench world, "
        f"{r['profile_steps']} steps under `torch.profiler`; shares of the profiled step time "
        "(ranges opened by forward hooks on the vision tower + projector and the language "
        "model; backward is not split, the vision side is frozen so it has none).",
        "",
    ]
    names = list(r["profiles"]["artifact"]["shares"])
    rows = [
        (n, *(f"{r['profiles'][m]['shares'][n]:.1%}" for m in ("artifact", "in-loop")))
        for n in names
    ]
    rows.append(
        (
            "step (wall)",
            *(
                f"{r['profiles'][m]['wall_s_per_step'] * 1000:.0f} ms"
                for m in ("artifact", "in-loop")
            ),
        )
    )
    lines += _table(["part", "reference artifact", "reference in-loop"], rows)
    pa, pi = r["profiles"]["artifact"], r["profiles"]["in-loop"]
    ref = r["reference_step_s"]
    lines += [
        "",
        f"Counters per step: image encodes per pair {pa['image_encodes_per_pair_step']:.2f} "
        f"(vision-tower images / pairs; without sharing it would be one per row, "
        f"{pa['lm_rows_per_forward'][0] / 8:.1f} per pair; pairs whose questions share a scan "
        f"share its encode, so it is below 2 = one v plus one v' per pair); language-model "
        f"forwards {pa['lm_forwards_per_step']} with the artifact (rows "
        f"{pa['lm_rows_per_forward']}: the policy on every row, the reference on the (v, y+) "
        f"rows only, for the KL) vs {pi['lm_forwards_per_step']} in-loop (rows "
        f"{pi['lm_rows_per_forward']}: the reference on every row).",
        "",
        f"Reference artifact vs in-loop, step time (medians of {r['repeats']}, alternated): "
        f"{ref['artifact'] * 1000:.0f} ms vs {ref['in-loop'] * 1000:.0f} ms "
        f"({ref['artifact'] / ref['in-loop'] - 1:+.0%}).",
        "",
    ]
    g = r["length_grouping"]
    lines += [
        f"Length grouping (`TrainConfig.group_by_length`, `length_grouped_permutation`): one "
        f"epoch of {r['pairs']} pairs, alternated, medians of {r['repeats']}:",
        "",
    ]
    lines += _table(
        ["order", "padded share of computed positions", "pairs/s"],
        [
            (m, f"{g[m]['padding']:.1%}", f"{g[m]['pairs_per_s']:.1f}")
            for m in ("random", "grouped")
        ],
    )
    lines += [""]
    return lines


def _loss_section(r: dict) -> list[str]:
    lines = ["## 3. Loss path: fused vs naive at V = 151,936 (`python bench/loss_memory.py`)", ""]
    if "error" in r:
        return [*lines, f"Failed: ```{r['error'][-800:]}```", ""]
    a = r["args"]
    cmd = f"--hidden {a['hidden']} --seqs {a['seqs']} --tokens {a['tokens']}"
    lines += [
        f"`make bench` runs the reduced setting (`{cmd}`, vocabulary {a['vocab']:,}); the "
        "full-size run (hidden 1024, 8 x 256 tokens, ~17-28 min) is kept below, under "
        "'Measured earlier'.",
        "",
    ]
    md = r.get("markdown", "").splitlines()
    body = [ln for ln in md if not ln.startswith("## ")]
    return [*lines, *body, ""]


def _stages_section(r: dict) -> list[str]:
    lines = ["## 4. Stages (`python -m bench.stages`, `python -m bench.cycle`)", ""]
    if "error" in r:
        return [*lines, f"Failed: ```{r['error'][-800:]}```", ""]
    s = r["sampling"]
    lines += [
        f"Sampling, `hf` engine, tiny LLaVA with random weights (every answer runs the full "
        f"{s['max_new_tokens']}-token budget), {s['prompts']} prompts, 1 thread:",
        "",
    ]
    lines += _table(
        ["temperature", "batch 1 (prompts/s)", "batch 16 (prompts/s)", "ratio"],
        [
            (
                t,
                f"{v['batch_1']:.1f}",
                f"{v['batch_16']:.1f}",
                f"{v['batch_16'] / v['batch_1']:.1f}x",
            )
            for t, v in s["temperatures"].items()
        ],
    )
    j, c, e = r["judge"], r["corruption"], r["evaluation"]
    lines += [
        "",
        f"Rules judge: {j['records_per_s']:,.0f} records/s ({j['rollouts']} rollouts, half "
        f"correct, half wrong; {j['pairs']} pairs).",
        "",
        f"Corruption, `corrupt()` per kind, {c['images']} scans of {c['size']} px, 1 thread, "
        "best of the repeats:",
        "",
    ]
    lines += _table(["kind", "images/s"], [(k, f"{v:,.0f}") for k, v in c["images_per_s"].items()])
    lines += [
        "",
        f"Evaluation (`evaluate_policy`, default config, grounding passes "
        f"{'on' if e['grounding'] else 'off'}, up to {e['max_new_tokens']} new tokens): "
        f"{e['samples_per_s']:.1f} samples/s ({e['samples']} samples in {e['seconds']:.1f} s).",
        "",
    ]
    return lines


def _cycle_section(r: dict) -> list[str]:
    lines = ["### Prefect vs direct calls, cached rerun, scaling (`python -m bench.cycle`)", ""]
    if "error" in r:
        return [*lines, f"Failed: ```{r['error'][-800:]}```", ""]
    f, c = r["full"], r.get("cached", {})
    lines += [
        "Config: `configs/default.yaml` with "
        f"`{json.dumps(r['overrides'], separators=(',', ':'))}` (same model and stages; "
        "smaller so that the suite fits its budget). Whole process wall time (start-up, "
        f"imports, Prefect's temporary API included), fresh store each, alternated, medians of "
        f"{r['repeats']}.",
        "",
    ]
    rows = []
    for label, d in (("full cycle", f), ("cached rerun (every stage cached)", c)):
        for mode, how in (("served", "running server"), ("prefect", "temporary API")):
            if mode in d:
                p, q = d[mode]["process_s"], d["direct"]["process_s"]
                rows.append(
                    (f"{label}, Prefect ({how})", f"{p:.1f} s", f"{q:.1f} s",
                     f"{p / q:.2f}x", f"{p - q:+.1f} s")
                )  # fmt: skip
    lines += _table(["run", "Prefect", "direct", "ratio", "Prefect overhead"], rows)
    lines += [
        "",
        '"Running server" is how deployments run (`make serve`: the server is up already);'
        ' "temporary API" is `make run`, which starts Prefect\'s temporary server in every '
        "process (about 10-20 s here, most of the temporary-API overhead).",
    ]
    sc = r.get("scaling") or []
    if sc:
        order = ("sample", "judge", "corrupt", "reference", "train", "evaluate")
        stages = [k for k in order if k in sc[0]["stage_s"]]
        lines += [
            "",
            "One round vs training-data size (direct calls; seconds per stage from the "
            "manifests; the test split is fixed, so `evaluate` stays constant by design):",
            "",
        ]
        lines += _table(
            [
                "data",
                "train scans",
                "sampled",
                "pairs",
                *stages,
                "round",
                "round / (1x round x factor)",
            ],
            [
                (
                    f"{s['factor']}x",
                    s["train_images"],
                    s["sampled_records"],
                    s["pairs"],
                    *(f"{s['stage_s'].get(k, 0):.1f}" for k in stages),
                    f"{s['round_s']:.1f} s",
                    f"{s['round_s'] / (sc[0]['round_s'] * s['factor'] / sc[0]['factor']):.2f}",
                )
                for s in sc
            ],
        )
        if len(sc) >= 3:
            a, b = sc[-2], sc[-1]
            per_unit = (b["round_s"] - a["round_s"]) / (b["factor"] - a["factor"])
            fixed = sc[0]["round_s"] - per_unit * sc[0]["factor"]
            lines += [
                "",
                f"Read as fixed + linear: the last two sizes add {per_unit:.1f} s per 1x of "
                f"data, which leaves {fixed:.1f} s of the 1x round as fixed cost (model loads, "
                "stage start-up); a positive fixed part is why the ratio column falls below 1.",
            ]
    lines += [""]
    return lines


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """BENCHMARKS.md from the collected results and the run's metadata."""
    m = meta["machine"]
    v = meta["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} in {meta['wall_s'] / 60:.1f} min. "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, "
        f"GPU: {m['gpu'] or 'none'}; load average (1 min) {meta['load_before']:.1f} before, "
        f"{meta['load_after']:.1f} after (the machine is shared: absolute times are upper "
        "bounds; ratios are taken side by side, alternated, and are what we claim). "
        + ", ".join(f"{k} {val}" for k, val in v.items())
        + ".",
        "",
        "## Goals",
        "",
    ]
    lines += _table(["what", "measured", "goal", "verdict"], goals(results))
    lines += [""]
    if "trainer" in results:
        lines += _trainer_section(results["trainer"])
    if "profile" in results:
        lines += _profile_section(results["profile"])
    if "loss" in results:
        lines += _loss_section(results["loss"])
    if "stages" in results:
        lines += _stages_section(results["stages"])
    if "cycle" in results:
        lines += _cycle_section(results["cycle"])
    if "real_shape" in results:
        lines += real_section(
            results["real_shape"],
            "## 5. Real shape: trainers at V = 151,936 (`python -m bench.real_shape`)",
        )
    lines += [
        "## 6. GPU",
        "",
        (
            "Not measured: no GPU was available to the session that generated this file."
            if not m["gpu"]
            else f"A GPU ({m['gpu']}) was present, but the real-size GPU comparison is not "
            "part of this suite yet: not measured."
        ),
        "",
        "## Time per benchmark",
        "",
    ]
    lines += _table(
        ["benchmark", "wall time"],
        [(k, f"{r.get('seconds', 0):.0f} s") for k, r in results.items()],
    )
    lines += [""]
    if meta.get("kept"):
        lines += [meta["kept"].rstrip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke sizes (development)")
    ap.add_argument(
        "--only", help="comma-separated subset of: trainer,profile,loss,stages,cycle,real_shape"
    )
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--results", type=Path, help="also save the collected results (JSON) here")
    ap.add_argument("--render", type=Path, help="render saved results instead of running")
    args = ap.parse_args(argv)
    names = ["trainer", "profile", "loss", "stages", "cycle", "real_shape"]
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    if args.render:
        saved = json.loads(args.render.read_text())
        results, meta = saved["results"], saved["meta"]
    else:
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="fire-mpo-bench-") as tmp:
            results = run_benchmarks(names, args.quick, Path(tmp))
        meta = {
            "command": "make bench"
            if not (args.quick or args.only)
            else "python -m bench.run_all " + " ".join(argv or sys.argv[1:]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - t0,
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "machine": machine_info(),
            "versions": versions(),
        }
    meta["kept"] = KEPT.read_text() if KEPT.is_file() else ""
    if args.results:
        args.results.write_text(json.dumps({"results": results, "meta": meta}, indent=1))
    args.out.write_text(render(results, meta))
    print(f"wrote {args.out} ({meta['wall_s'] / 60:.1f} min)", file=sys.stderr)
    failed = [k for k, r in results.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
