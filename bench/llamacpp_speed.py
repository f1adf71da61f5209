"""Benchmark (not a test): qkiln's runtime against llama.cpp built for this CPU, same GGUF files, same run (issue #18).

    python bench/llamacpp_speed.py [--types q4_0,q4_k_m,q8_0] [--rounds 2] [--threads 2] [--work DIR] [--no-ppl]

llama.cpp is bench/llamacpp_ref.py's build (the pinned llama-cpp-python sdist's llama.cpp, this CPU's ISA
flags), never the tests' AVX2-only wheel, which would flatter qkiln.
Files: the demo model's GGUFs made by `qkiln convert --to gguf --scheme TYPE --algo rtn`; to show they are
what llama.cpp's own quantizer makes, each is compared tensor by tensor (names, types, data bytes) with
`llama-quantize` of qkiln's F32 GGUF.
Speed, rounds interleaved (per round and file: llama.cpp, then qkiln):
- llama.cpp: `llama-bench -m FILE -p 128 -n 64 -t THREADS -r REPS -o json` (pp128 and tg64, its mean over its
  repetitions); in three configurations: as is, with OMP_WAIT_POLICY=passive, and with 1 thread. On a host with more runnable
  threads than cores its OpenMP barrier spinning costs it up to 10x with 2 threads (llamacpp_ref.PASSIVE_OMP);
  llama.cpp's figure for each metric is its best configuration's, all three are reported;
- qkiln: `qkiln bench FILE --e2e --json --threads THREADS --prompt-tokens 128`: e2e prompt (the bench prompt's
  tokens repeated to 128, processed 3 times into a fresh KV cache, mean tokens/s as llama-bench's) and decode (32
  tokens) through the full runtime, the linear layers alone (decode 1 row, prompt 128 rows), and the machine's
  read bandwidth measured in the same process.
Median over rounds. The ratios are qkiln / llama.cpp (prompt: e2e 128 tokens against pp128), printed per file with
the load averages both ran at. Each decode's share of the read bandwidth = decode tokens/s x the file's tensor bytes (the
tied embedding is the output head, so every weight is read per token) / machine_read_gbs.
With ppl (default): `llama-perplexity` on Q4_K_M over GPL-2 + Apache-2.0 + MPL-2.0 at ctx 512 beside
`qkiln eval --model Q4_K_M.gguf` on the same text (both: tokens/s of the forward passes).
Prints one JSON document on stdout (progress on stderr), writes it to WORK/results.json, and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_vs_llamacpp import EVAL_FILES
from llamacpp_ref import PASSIVE_OMP, build_info, enabled, log, run_measured, tools

BIN = Path(sys.executable).parent
QTYPE = {"q4_0": "Q4_0", "q4_k_m": "Q4_K_M", "q8_0": "Q8_0"}
# llama-bench configurations; llama.cpp's figure is the best of them, so a busy host's effect on one
# configuration (OpenMP spinning, see llamacpp_ref.PASSIVE_OMP) never makes it look slow. name -> (env, threads
# or None for --threads).
VARIANTS: dict[str, tuple[dict[str, str], int | None]] = {"default": ({}, None), "omp-passive": (PASSIVE_OMP, None),
                                                           "1-thread": ({}, 1)}


def make_files(types: list[str], demo: Path, work: Path, bin_dir: Path, threads: int) -> dict[str, dict]:
    """qkiln's RTN GGUF per type, checked against llama-quantize's from the same F32 GGUF."""
    from qkiln.formats.gguf_read import read_gguf

    f32 = work / "f32.gguf"
    if not f32.exists():
        run_measured([str(BIN / "qkiln"), "convert", "--to", "gguf", "--model", str(demo), "--scheme", "f32", "-o", str(f32)], work)
    out = {}
    for t in types:
        path = work / f"{t}.gguf"
        if not path.exists():
            log(f"qkiln convert {t} (rtn) ...")
            run_measured([str(BIN / "qkiln"), "convert", "--to", "gguf", "--model", str(demo), "--scheme", t, "--algo", "rtn",
                          "-o", str(path)], work)
        theirs = work / f"llama-quantize-{t}.gguf"
        if not theirs.exists():
            run_measured([str(bin_dir / "llama-quantize"), str(f32), str(theirs), QTYPE[t], str(threads)], work)
        ours, ref = read_gguf(path), read_gguf(theirs)
        a = {x.name: (x.ggml_type.name, x.data.tobytes()) for x in ours.tensors.values()}
        b = {x.name: (x.ggml_type.name, x.data.tobytes()) for x in ref.tensors.values()}
        differ = sorted(n for n in a.keys() | b.keys() if a.get(n) != b.get(n))
        out[t] = {"path": str(path), "file_bytes": path.stat().st_size,
                  "weight_bytes": sum(x.nbytes for x in ours.tensors.values()),
                  "tensors_identical_to_llama_quantize": not differ, "tensors_differing": differ[:10]}
        log(f"{t}: {len(a)} tensors, {'identical to' if not differ else f'{len(differ)} differ from'} llama-quantize's")
    return out


def llama_bench(bin_dir: Path, path: str, prompt: int, decode: int, threads: int, reps: int, work: Path,
                env: dict[str, str]) -> dict:
    meas, text, _ = run_measured([str(bin_dir / "llama-bench"), "-m", path, "-p", str(prompt), "-n", str(decode),
                                  "-t", str(threads), "-r", str(reps), "-o", "json"], work, env=env)
    rows = json.loads(text)
    out = {"load_average": meas["load_average"], "threads": threads, "env": env, "cpu_info": rows[0].get("cpu_info"),
           "backends": rows[0].get("backends"), "build_commit": rows[0].get("build_commit")}
    for r in rows:
        key = f"pp{r['n_prompt']}" if r["n_gen"] == 0 else f"tg{r['n_gen']}"
        out[key] = round(r["avg_ts"], 2)
        out[f"{key}_stddev"] = round(r["stddev_ts"], 2)
    return out


def qkiln_bench(path: str, threads: int, prompt: int, work: Path) -> dict:
    meas, text, _ = run_measured([str(BIN / "qkiln"), "bench", path, "--e2e", "--json", "--threads", str(threads),
                                  "--prompt-tokens", str(prompt)], work)
    doc = json.loads(text)
    return {**doc, "load_average": meas["load_average"]}


def llamacpp_perplexity(bin_dir: Path, path: str, text: Path, work: Path, threads: int, env: dict[str, str]) -> dict:
    meas, out, err = run_measured([str(bin_dir / "llama-perplexity"), "-m", path, "-f", str(text), "-c", "512", "-b", "512",
                                   "-t", str(threads)], work, env=env)
    out += err
    # The tool's log lines carry a minutes.seconds.milliseconds.microseconds stamp; the forward passes (and the
    # tool's own scoring of their logits) run between these two lines.
    stamp = r"(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) I "
    start = re.search(stamp + r"perplexity: calculating perplexity over (\d+) chunks, n_ctx=(\d+)", out)
    end = re.search(stamp + r"Final estimate: PPL = ([\d.]+)", out)
    if not (start and end):
        raise SystemExit(f"llama-perplexity printed no timing/estimate:\n{out[-3000:]}")

    def seconds(m: re.Match) -> float:
        return int(m.group(1)) * 60 + int(m.group(2)) + int(m.group(3)) / 1e3 + int(m.group(4)) / 1e6

    tokens = int(start.group(5)) * int(start.group(6))
    took = seconds(end) - seconds(start)
    return {"tokens": tokens, "seconds": round(took, 2), "tokens_per_s": round(tokens / took, 1), "chunks": int(start.group(5)),
            "ppl": float(end.group(5)), "ppl_scores": "second half of each chunk", "env": env, **meas}


def ppl_speed(bin_dir: Path, path: str, work: Path, threads: int) -> dict:
    """llama-perplexity (default OpenMP waiting and passive; the faster counts) vs qkiln eval on the same file and
    text: tokens/s of the forward passes, perplexity."""
    text = work / "eval.txt"
    text.write_text("".join(p.read_text(encoding="utf-8") for p in EVAL_FILES), encoding="utf-8")
    llama = {}
    for name, env in (("default", {}), ("omp-passive", PASSIVE_OMP)):
        log(f"llama-perplexity ({name}) ...")
        llama[name] = llamacpp_perplexity(bin_dir, path, text, work, threads, env)
    best = max(llama, key=lambda n: llama[n]["tokens_per_s"])
    log("qkiln eval ...")
    meas, out, _ = run_measured([str(BIN / "qkiln"), "eval", "--model", path, "--text", str(text), "--ctx", "512", "--json"],
                                work)
    doc = json.loads(out)
    qk = {"tokens": doc["windows"] * doc["ctx"], "seconds": round(doc["seconds"], 2),
          "tokens_per_s": round(doc["tokens_per_second"], 1), "windows": doc["windows"], "ppl": round(doc["perplexity"], 4),
          "ppl_scores": "tokens 1..511 of each window", **meas}
    return {"llamacpp": llama, "llamacpp_best": best, "qkiln": qk,
            "ratio_tokens_per_s": round(qk["tokens_per_s"] / llama[best]["tokens_per_s"], 3)}


def summarize(files: dict[str, dict], llama: dict[str, dict[str, list[dict]]], qk: dict[str, list[dict]], prompt: int,
              decode: int) -> dict[str, dict]:
    """Medians over rounds; llama.cpp's figure per metric is its best configuration's median."""
    def med(xs) -> float:
        return round(statistics.median(xs), 2)

    rows = {}
    for t, f in files.items():
        read_gbs = med(r["machine_read_gbs"] for r in qk[t])
        by_variant = {v: {k: med(r[k] for r in runs) for k in (f"pp{prompt}", f"tg{decode}")}
                      for v, runs in llama[t].items()}
        row: dict = {"weight_mb": round(f["weight_bytes"] / 1e6, 2), "llamacpp_variants": by_variant}
        for key, metric in (("llamacpp_pp", f"pp{prompt}"), ("llamacpp_tg", f"tg{decode}")):
            best = max(by_variant, key=lambda v, m=metric: by_variant[v][m])
            row[key], row[f"{key}_variant"] = by_variant[best][metric], best
        row.update({
            "qkiln_e2e_prompt": med(r["e2e_prompt_tokens_per_s"] for r in qk[t]),
            "qkiln_e2e_decode": med(r["e2e_decode_tokens_per_s"] for r in qk[t]),
            "qkiln_linears_prompt": med(r["prompt_tokens_per_s"] for r in qk[t]),
            "qkiln_linears_decode": med(r["decode_tokens_per_s"] for r in qk[t]),
            "machine_read_gbs": read_gbs,
            "load_average_llamacpp": [r["load_average"] for runs in llama[t].values() for r in runs],
            "load_average_qkiln": [r["load_average"] for r in qk[t]],
            "qkiln_kernel_path": qk[t][0]["kernel_path"],
            "qkiln_types": qk[t][0]["types"],  # each timed as itself: `qkiln bench` refuses a type without a kernel
        })
        row["prompt_ratio"] = round(row["qkiln_e2e_prompt"] / row["llamacpp_pp"], 3)
        row["decode_ratio"] = round(row["qkiln_e2e_decode"] / row["llamacpp_tg"], 3)
        row["llamacpp_decode_read_share"] = round(row["llamacpp_tg"] * f["weight_bytes"] / 1e9 / read_gbs, 3)
        row["qkiln_decode_read_share"] = round(row["qkiln_e2e_decode"] * f["weight_bytes"] / 1e9 / read_gbs, 3)
        rows[t] = row
    return rows


def table(rows: dict[str, dict], prompt: int, decode: int) -> str:
    head = (f"| GGUF | weight MB | llama.cpp pp{prompt} | qkiln e2e prompt ({prompt}) | prompt ratio | "
            f"qkiln linears prompt ({prompt} rows) | llama.cpp tg{decode} | qkiln e2e decode | decode ratio | "
            f"llama.cpp decode / read BW | qkiln decode / read BW | read GB/s | llama.cpp tg{decode} by config | "
            "weight types |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for t, r in rows.items():
        configs = ", ".join(f"{v} {m[f'tg{decode}']:.1f}" for v, m in r["llamacpp_variants"].items())
        out.append(f"| {t} | {r['weight_mb']:.1f} | {r['llamacpp_pp']:.0f} | {r['qkiln_e2e_prompt']:.0f} | "
                   f"{r['prompt_ratio']:.2f} | {r['qkiln_linears_prompt']:.0f} | {r['llamacpp_tg']:.1f} | "
                   f"{r['qkiln_e2e_decode']:.1f} | {r['decode_ratio']:.2f} | {r['llamacpp_decode_read_share']:.0%} | "
                   f"{r['qkiln_decode_read_share']:.0%} | {r['machine_read_gbs']:.1f} | {configs} | "
                   f"{', '.join(r['qkiln_types'])} |")
    return "\n".join(out)


def ratios(rows: dict[str, dict]) -> str:
    """One line per file: the prompt and decode ratios and the load averages (1, 5, 15 min) the runs saw."""
    def span(loads: list) -> str:
        ones = [la[0] if isinstance(la, list) else la for la in loads]
        return f"{min(ones):.1f}-{max(ones):.1f}"

    return "\n".join(f"{t}: prompt {r['prompt_ratio']:.2f}x ({r['qkiln_e2e_prompt']:.0f} / {r['llamacpp_pp']:.0f} tok/s), "
                     f"decode {r['decode_ratio']:.2f}x ({r['qkiln_e2e_decode']:.1f} / {r['llamacpp_tg']:.1f} tok/s); "
                     f"1-min load average llama.cpp {span(r['load_average_llamacpp'])}, qkiln {span(r['load_average_qkiln'])}"
                     for t, r in rows.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/qkiln-llamacpp-speed"))
    ap.add_argument("--types", default="q4_0,q4_k_m,q8_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per test")
    ap.add_argument("--no-ppl", dest="ppl", action="store_false", help="skip llama-perplexity vs qkiln eval")
    ap.add_argument("--resummarize", action="store_true", help="recompute WORK/results.json's summary from its rounds")
    args = ap.parse_args()
    if args.resummarize:
        path = args.work / "results.json"
        doc = json.loads(path.read_text())
        st = doc["settings"]
        doc["summary"] = summarize(doc["files"], doc["rounds"]["llamacpp"], doc["rounds"]["qkiln"], st["prompt"],
                                   st["decode"])
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        print(json.dumps(doc, indent=2, sort_keys=True))
        log(table(doc["summary"], st["prompt"], st["decode"]))
        log(ratios(doc["summary"]))
        return
    from qkiln.demo import demo_model_dir

    demo = demo_model_dir()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bin_dir, options = tools()
    types = args.types.split(",")
    files = make_files(types, demo, work, bin_dir, args.threads)
    llama: dict[str, dict[str, list[dict]]] = {t: {v: [] for v in VARIANTS} for t in types}
    qk: dict[str, list[dict]] = {t: [] for t in types}
    for r in range(args.rounds):
        for t in types:
            for v, (env, threads) in VARIANTS.items():
                a = llama_bench(bin_dir, files[t]["path"], args.prompt, args.decode, threads or args.threads, args.reps,
                                work, env)
                llama[t][v].append(a)
                log(f"round {r + 1} {t}: llama.cpp {v}: pp{args.prompt} {a[f'pp{args.prompt}']:.0f} "
                    f"tg{args.decode} {a[f'tg{args.decode}']:.1f} (load average {a['load_average']})")
            qk[t].append(qkiln_bench(files[t]["path"], args.threads, args.prompt, work))
            b = qk[t][-1]
            log(f"round {r + 1} {t}: qkiln e2e prompt {b['e2e_prompt_tokens_per_s']:.0f} decode {b['e2e_decode_tokens_per_s']:.1f}, "
                f"linears prompt {b['prompt_tokens_per_s']:.0f} decode {b['decode_tokens_per_s']:.1f}, read {b['machine_read_gbs']} GB/s "
                f"(load average {b['load_average']})")
    rows = summarize(files, llama, qk, args.prompt, args.decode)
    doc = {
        "summary": rows,
        "files": files,
        "rounds": {"llamacpp": llama, "qkiln": qk},
        "perplexity_speed_q4_k_m": None,
        "llamacpp": {"bin": str(bin_dir), "flags": enabled(options), **build_info(bin_dir)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "cpu": os.cpu_count(),
    }
    (work / "results.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")  # the rounds are kept whatever follows
    log(table(rows, args.prompt, args.decode))
    log(ratios(rows))
    if args.ppl and "q4_k_m" in files:
        doc["perplexity_speed_q4_k_m"] = ppl_speed(bin_dir, files["q4_k_m"]["path"], work, args.threads)
    (work / "results.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    print(json.dumps(doc, indent=2, sort_keys=True))
    if doc["perplexity_speed_q4_k_m"]:
        p = doc["perplexity_speed_q4_k_m"]
        lp = p["llamacpp"]
        log(f"Q4_K_M over the eval text at ctx 512: llama-perplexity {lp['default']['tokens_per_s']} tok/s default, "
            f"{lp['omp-passive']['tokens_per_s']} passive OpenMP (PPL {lp['default']['ppl']}, second halves), "
            f"qkiln eval {p['qkiln']['tokens_per_s']} tok/s "
            f"(PPL {p['qkiln']['ppl']}, whole windows): ratio {p['ratio_tokens_per_s']}")


if __name__ == "__main__":
    main()
