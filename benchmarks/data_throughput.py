"""Clean and tokenize throughput (MB/s) and peak RSS on a synthetic corpus of a given size.

    python benchmarks/data_throughput.py --size-mb 2000 --workdir /tmp/bench
    python benchmarks/data_throughput.py --size-mb 2000 --workdir /tmp/bench --engine ray
    python benchmarks/data_throughput.py --size-mb 2000 --workdir /tmp/bench --tokenizer-chars 250000000

Each stage runs as `python -m stages ...` in a subprocess, as DVC runs it; peak RSS is the largest sum
of resident memory over the stage's whole process tree (the workers included; with `--engine ray`, the
Ray instance the stage starts: its raylet, object store and workers), sampled every 200 ms. By default the
tokenizer is trained on a small sample, cleaned on the side: its speed is not what this measures. With
`--tokenizer-chars N` it is trained on the whole cleaned corpus with `tokenizer.max_train_chars: N`, and
its time and peak RSS are reported: what a bounded tokenizer costs as the corpus grows.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(out: Path, size_mb: int, seed: int = 0) -> int:
    """Write ~size_mb of text as .txt documents of 2-64 KB: Zipf-distributed words, sentences, lines,
    paragraphs, with a share of non-Latin scripts. Returns bytes written."""
    rng = np.random.default_rng(seed)
    alphabets = ["abcdefghijklmnopqrstuvwxyz"] * 8 + ["αβγδεζηθικλμνξοπρστυφχψω", "абвгдежзийклмнопрстуфхцчшщыэюя"]
    words = []
    for _ in range(50_000):
        letters = alphabets[rng.integers(len(alphabets))]
        word = "".join(rng.choice(list(letters), size=rng.integers(1, 10)))
        words.append(word.capitalize() if rng.random() < 0.1 else word)
    words = np.array(words, dtype=object)
    seps = np.array([" "] * 40 + [", ", ". ", "; ", "! ", "? ", "\n", "\n\n"], dtype=object)
    out.mkdir(parents=True, exist_ok=True)
    written, index = 0, 0
    target = size_mb * 1_000_000
    while written < target:
        n_words = int(rng.integers(300, 10_000))
        ids = np.minimum(rng.zipf(1.2, size=n_words) - 1, len(words) - 1)
        parts = np.empty(2 * n_words, dtype=object)
        parts[0::2] = words[ids]
        parts[1::2] = seps[rng.integers(len(seps), size=n_words)]
        data = "".join(parts).encode()
        shard = out / f"{index // 1000:04d}"
        shard.mkdir(exist_ok=True)
        (shard / f"doc{index:08d}.txt").write_bytes(data)
        written += len(data)
        index += 1
    return written


def run_stage(args: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB of the process tree) for one `python -m stages` command."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "stages", *args], cwd=cwd, env=env)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"stage {args[0]} failed with exit code {proc.returncode}")
    return time.perf_counter() - start, peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llm-bench"))
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--engine", choices=["local", "ray"], default="local")
    parser.add_argument("--tokenizer-chars", type=int, default=0,
                        help="train the tokenizer on the whole corpus with this max_train_chars (0: on a sample)")
    parser.add_argument("--stages", default="clean,tokenizer,tokenize", help="which stages to time")
    args = parser.parse_args()
    stages = args.stages.split(",")

    work = args.workdir
    raw = work / "data/raw"
    if not raw.is_dir() or json.loads((work / "corpus.json").read_text())["size_mb"] != args.size_mb:
        t = time.perf_counter()
        nbytes = make_corpus(raw, args.size_mb)
        (work / "corpus.json").write_text(json.dumps({"size_mb": args.size_mb, "bytes": nbytes}))
        print(f"corpus: {nbytes / 1e6:.0f} MB written in {time.perf_counter() - t:.0f} s")
    nbytes = json.loads((work / "corpus.json").read_text())["bytes"]
    sample = work / "sample"
    if not sample.is_dir():
        sample.mkdir()
        for path in sorted(raw.rglob("*.txt"))[:500]:
            (sample / path.name).write_bytes(path.read_bytes())

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(raw)
    params["tokenizer"]["vocab_size"] = args.vocab_size
    params["tokenizer"]["max_train_chars"] = args.tokenizer_chars
    for section in ("clean", "tokenize"):
        params[section]["num_workers"] = args.num_workers
        params[section]["engine"] = args.engine
    (work / "params.yaml").write_text(yaml.safe_dump(params))

    results = {}
    if "clean" in stages:
        results[f"clean ({args.engine})"] = run_stage(["clean"], work)
    if "tokenizer" in stages and args.tokenizer_chars:
        results[f"tokenizer ({args.tokenizer_chars / 1e6:.0f}M chars)"] = run_stage(["tokenizer"], work)
    elif "tokenizer" in stages:  # trained on 500 sample documents, cleaned on the side
        sample_args = ["--raw", "sample", "--out", "data/clean-sample", "--metrics", "metrics/clean-sample.json"]
        run_stage(["clean", *sample_args], work)
        results["tokenizer (sample)"] = run_stage(["tokenizer", "--clean", "data/clean-sample"], work)
    if "tokenize" in stages:
        results[f"tokenize ({args.engine})"] = run_stage(["tokenize"], work)

    workers = args.num_workers or os.cpu_count()
    print(f"\ncorpus {nbytes / 1e6:.0f} MB, {os.cpu_count()} CPUs, engine {args.engine}, local workers {workers}")
    print(f"{'stage':<24} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>12}")
    for stage, (seconds, rss) in results.items():
        rate = f"{nbytes / 1e6 / seconds:8.1f}" if "sample" not in stage else "       -"
        print(f"{stage:<24} {seconds:8.1f} {rate} {rss:12.0f}")
    if "tokenize" in stages:
        meta = json.loads((work / "data/tokens/meta.json").read_text())
        tokens = sum(split["tokens"] for split in meta["splits"].values())
        print(f"tokens written: {tokens:,} ({nbytes / tokens:.2f} bytes per token)")


if __name__ == "__main__":
    main()
