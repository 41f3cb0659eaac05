"""Benchmark tokenizer.py and data.py on a local WikiExtractor sample; prints a markdown table.

    python bench_data.py --corpus '/work/shared/data/wikipedia/AA/wiki_*'

Measured side by side in one run (the CPU may be shared): tokenizer training time; data.py throughput and
peak RSS (a subprocess; peak RSS via getrusage(RUSAGE_CHILDREN) in a small launcher) on a part and on all of the
corpus; and the ceiling: the tokenizers library's encode_batch / encode_batch_fast over the same documents already
in memory (one call, or 1 MB batches). Ratio = data.py rate / best ceiling rate, both in MB of document text per
second (data.py's own timer: reading + encoding + writing), and by CPU seconds per MB (data.py: the whole process,
start-up included), which a busy machine disturbs less.
"""
import glob
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import common
import corpus
import data

HERE = os.path.dirname(os.path.abspath(__file__))


# Peak RSS comes from a small launcher process: a child forked straight from this (large) process would count
# this process's memory in its own ru_maxrss.
_LAUNCHER = ("import json, resource, subprocess, sys\n"
             "rc = subprocess.run(sys.argv[2:]).returncode\n"
             "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "open(sys.argv[1], 'w').write(json.dumps([u.ru_maxrss, u.ru_utime + u.ru_stime]))\n"
             "sys.exit(rc)\n")


def run_measured(args: list[str], work: str) -> tuple[float, float, float]:
    """Run a script of this folder; return (wall seconds, CPU seconds, peak RSS in MB) of that process."""
    usage_file = os.path.join(work, "usage.json")
    start = time.time()
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, usage_file, sys.executable, *args], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({result.returncode}): {result.stdout}")
    with open(usage_file) as f:
        maxrss_kib, cpu = json.load(f)
    return time.time() - start, cpu, maxrss_kib / 1024


def ceiling(tok, docs: list[str], method: str, batch_bytes: int | None) -> tuple[float, float]:
    """(wall, CPU) seconds of the library's batch encoder over all documents: one call, or batches of about
    batch_bytes of text (as data.py makes them)."""
    batches = [batch for batch, _ in data._batches(iter(docs), batch_bytes or math.inf)]
    encode = getattr(tok, method)
    start, start_cpu = time.time(), time.process_time()  # CPU time of all threads, Rayon's included
    for batch in batches:
        encode(batch, add_special_tokens=False)
    return time.time() - start, time.process_time() - start_cpu


def main() -> None:
    p = common.ArgumentParser(__doc__)
    p.add_argument("--corpus", default="/work/shared/data/wikipedia/AA/wiki_*", help="glob of WikiExtractor files")
    p.add_argument("--part_files", type=common.positive_int, default=15,
                   help="files in the smaller data.py run (default: 15)")
    p.add_argument("--vocab_size", type=common.int_in(6), default=32768, help="tokenizer vocabulary (default: 32768)")
    p.add_argument("--repeats", type=common.positive_int, default=2,
                   help="runs of each throughput measurement; best kept (default: 2)")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training one (skips that measurement)")
    args = p.parse_args()
    files = sorted(glob.glob(args.corpus))
    if not files:
        raise SystemExit(f"no files match {args.corpus}")
    work = tempfile.mkdtemp(prefix="bench_data_")
    rows = []  # (measurement, MB/s, tokens/s, CPU s per MB, peak RSS)

    tok_path = args.tokenizer or os.path.join(work, "tokenizer.json")
    if not args.tokenizer:
        wall, cpu, rss = run_measured(["tokenizer.py", "--text_files", *files, "--num_docs", "0",
                                       "--vocab_size", str(args.vocab_size), "--out", tok_path], work)
        rows.append((f"tokenizer.py training, {len(files)} files, vocab {args.vocab_size}: {wall:.1f} s",
                     "", "", "", f"{rss:.0f} MB"))

    docs = list(corpus.iter_documents(files, num_docs=0))
    text_mb = sum(len(d.encode("utf-8")) for d in docs) / 1e6
    tok = common.load_tokenizer(tok_path)
    tok.no_padding()
    tokens_per_mb = (sum(len(e.ids) for e in tok.encode_batch_fast(docs, add_special_tokens=False))
                     + len(docs)) / text_mb  # + one [SEP] per document, as data.py counts

    def data_run(n_files: int) -> tuple[float, float, float]:
        """(MB/s by data.py's own timer, CPU s per MB of the whole process, peak RSS MB)."""
        out = os.path.join(work, f"data_{n_files}")
        _, cpu, rss = run_measured(["data.py", "--tokenizer", tok_path, "--out", out, "--overwrite",
                                    "--num_docs", "0", "--text_files", *files[:n_files]], work)
        with open(os.path.join(out, "meta.json")) as f:
            stats = json.load(f)["stats"]
        mb = stats["text_bytes"] / 1e6
        return mb / stats["seconds"], cpu / mb, rss

    variants = [("encode_batch", None), ("encode_batch", 1 << 20), ("encode_batch_fast", 1 << 20)]
    best = {v: (0.0, float("inf")) for v in variants}  # (MB/s, CPU s per MB)
    best_data = (0.0, float("inf"), 0.0)
    for _ in range(args.repeats):  # interleaved, so that a busy neighbour hurts both sides alike
        for v in variants:
            wall, cpu = ceiling(tok, docs, *v)
            best[v] = (max(best[v][0], text_mb / wall), min(best[v][1], cpu / text_mb))
        mb_s, cpu_mb, rss = data_run(len(files))
        best_data = (max(best_data[0], mb_s), min(best_data[1], cpu_mb), max(best_data[2], rss))
    for (method, batch_bytes), (mb_s, cpu_mb) in best.items():
        how = "one call" if batch_bytes is None else f"{batch_bytes / 1e6:.1f} MB batches"
        rows.append((f"ceiling: {method}, {len(docs)} docs in memory, {how}", f"{mb_s:.2f}",
                     f"{mb_s * tokens_per_mb / 1e3:.0f}k", f"{cpu_mb:.2f}", ""))
    part = data_run(args.part_files)
    for n, (mb_s, cpu_mb, rss) in ((len(files), best_data), (args.part_files, part)):
        rows.append((f"data.py, {n} files", f"{mb_s:.2f}", f"{mb_s * tokens_per_mb / 1e3:.0f}k", f"{cpu_mb:.2f}",
                     f"{rss:.0f} MB"))
    ceiling_rate = max(r for r, _ in best.values())
    ceiling_cpu = min(c for _, c in best.values())
    rows.append(("**ratio data.py / best ceiling** (goal >= 0.8)", f"{best_data[0] / ceiling_rate:.2f}", "",
                 f"{ceiling_cpu / best_data[1]:.2f}", ""))

    load = os.getloadavg()[0]
    print(f"\n{text_mb:.1f} MB of document text, {len(docs)} documents, {os.cpu_count()} CPUs, best of "
          f"{args.repeats} interleaved runs, load average {load:.1f} at the end\n")
    print("| measurement | MB/s | tokens/s | CPU s per MB | peak RSS |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n(work files in {work})")


if __name__ == "__main__":
    main()
