"""Soak test of resume: train a tiny project once without interruption, then again while killing the train stage
(kill -9, or SIGTERM) at random moments and rerunning it each time, until it finishes; compare the two.

    python benchmarks/soak.py --kills 20 --steps 3000
    python benchmarks/soak.py --kills 10 --signal TERM

Each kill comes a random 0-6 s (--delay) after the stage logs its first step (it checkpoints every steps/20
steps, a few seconds apart), so kills land between checkpoints and inside checkpoint writes.

Prints the kills survived, how many reruns resumed from a checkpoint, and what differs from the uninterrupted
run: history rows, metrics and weight bytes (all 0 when resume is exact).
"""

import argparse
import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
CORPUS = "But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. " * 40


def stage(work: Path, command: str, log: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages", command], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=open(log, "w") if log else subprocess.DEVNULL,  # noqa: SIM115
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def wait_for_training(process: subprocess.Popen, log: Path) -> None:
    """Until the stage logs a step (start-up done) or exits."""
    while process.poll() is None and "step " not in log.read_text():
        time.sleep(0.1)


def make_project(work: Path, steps: int) -> None:
    """A project with a small corpus, a tiny model and the data stages run."""
    (work / "corpus").mkdir(parents=True)
    for i in range(20):
        (work / "corpus" / f"{i}.txt").write_text(f"Scene {i}. {CORPUS}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="corpus", val_fraction=0.25)
    params["clean"]["min_chars"] = 10
    params["tokenizer"].update(vocab_size=300, min_frequency=1)
    params["model"].update(n_layer=2, n_head=2, n_embd=32, block_size=32)
    params["train"].update(batch_size=4, max_steps=steps, warmup_steps=10, eval_interval=steps // 10,
                           eval_batches=2, log_interval=10, checkpoint_interval=steps // 20, dtype="float32")
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    for command in ("fetch", "clean", "tokenizer", "tokenize"):
        if stage(work, command).wait() != 0:
            sys.exit(f"the {command} stage failed in {work}")


def outputs(work: Path) -> tuple[list[dict], dict, dict]:
    with open(work / "plots" / "train.csv") as f:
        rows = [{k: v for k, v in row.items() if k not in ("tokens_per_sec", "mfu")} for row in csv.DictReader(f)]
    metrics = json.loads((work / "metrics" / "train.json").read_text())
    metrics = {k: metrics[k] for k in ("train_loss", "val_loss", "steps", "tokens_seen")}
    weights = load_file(str(work / "models" / "final" / "model.safetensors"))
    return rows, metrics, {name: t.numpy().tobytes() for name, t in weights.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--signal", choices=("KILL", "TERM"), default="KILL")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--delay", type=float, nargs=2, default=(0.0, 6.0),
                        help="seconds from the first logged step to the kill")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    sig = signal.Signals[f"SIG{args.signal}"]
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        make_project(base, args.steps)
        soak = Path(tmp) / "soak"
        shutil.copytree(base, soak)
        start = time.perf_counter()
        if stage(base, "train").wait() != 0:
            sys.exit("the uninterrupted training failed")
        whole = time.perf_counter() - start
        print(f"uninterrupted: {args.steps} steps in {whole:.1f} s")

        kills = resumed = 0
        while True:
            resumed += kills > 0 and any((soak / "models" / "checkpoints").glob("step_*"))
            log = Path(tmp) / "train.log"
            process = stage(soak, "train", log)
            if kills < args.kills:
                wait_for_training(process, log)
                time.sleep(rng.uniform(*args.delay))
                if process.poll() is None:
                    process.send_signal(sig)
                    kills += 1
            code = process.wait()
            if code == 0:
                break
            if code not in (-sig, 128 + sig):
                sys.exit(f"the train stage exited with {code} after {kills} kills")
        rows, metrics, weights = outputs(base)
        rows_s, metrics_s, weights_s = outputs(soak)
        differing_rows = sum(a != b for a, b in zip(rows, rows_s, strict=False)) + abs(len(rows) - len(rows_s))
        lost = sum(len(weights[name]) for name in weights if weights_s.get(name) != weights[name])
        print(f"kills survived ({args.signal}): {kills}; reruns that found a checkpoint: {resumed}")
        print(f"history rows differing: {differing_rows} of {len(rows)}; metrics equal: {metrics == metrics_s}; "
              f"weight bytes differing: {lost} of {sum(map(len, weights.values()))}")
        leftovers = [p.name for p in (soak / "models" / "checkpoints").iterdir() if p.name.startswith(".")]
        print(f"temp folders left in models/checkpoints: {len(leftovers)}")


if __name__ == "__main__":
    main()
