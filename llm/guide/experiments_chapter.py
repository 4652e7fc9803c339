"""Chapter 10: the experiments, the runs of the MLflow experiment side by side."""

import logging
from pathlib import Path
from typing import Any

from llm.errors import first_line
from llm.guide import figures
from llm.guide.document import Chapter, Figure, Table, Text
from llm.guide.inputs import Run
from llm.project import project_root
from llm.tracking import newest_runs, resolve_tracking_uri

log = logging.getLogger(__name__)

RUNS_SHOWN = 20
IGNORED_PARAMS = {"git_commit", "data_tokenizer_sha256"}


def differing_params(runs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for r in runs for k in r["params"]} - IGNORED_PARAMS)
    return [k for k in keys if len({r["params"].get(k) for r in runs}) > 1]


def experiments_chapter(run: Run, figure_dir: Path, run_id: str | None) -> Chapter:
    settings = run.settings.mlflow
    uri = resolve_tracking_uri(settings.tracking_uri, project_root())
    blocks: list = [Text(
        f"Every training is an MLflow run in the experiment `{settings.experiment}` at `{settings.tracking_uri}`, "
        "with all its params, its metrics at every log step, the model, and the evaluation and this guide as "
        "artifacts. `make ui` serves the MLflow UI on http://127.0.0.1:5000: select runs and press Compare to "
        "see their params side by side and their loss curves on one chart. `dvc exp run -S train.lr=0.01` "
        "trains a variant as a new run; `dvc exp show` lists them in the terminal.")]
    try:
        runs = [{"name": r.name, "id": r.run_id, "status": r.status, "params": r.params,
                 "bpb": r.metrics.get("eval/val_bpb", r.metrics.get("val_bpb_estimate"))}
                for r in newest_runs(uri, settings.experiment, RUNS_SHOWN)]
    except Exception as err:  # a server down or a bad URI: the guide is still built, and says so
        log.warning("MLflow at %s is not usable (%s): the guide lists no runs", uri, first_line(err))
        return Chapter("experiments", "Your experiments",
                       blocks + [Text(f"The runs could not be listed: MLflow at {uri} answered {first_line(err)}")])
    if not runs:
        return Chapter("experiments", "Your experiments", blocks + [Text("The experiment has no runs yet.")])
    keys = differing_params(runs)
    rows = [((r["name"] or r["id"][:8]) + (" (this run)" if r["id"] == run_id else ""), r["status"].lower(),
             f"{r['bpb']:.4f}" if r["bpb"] is not None else "",
             "; ".join(f"{k}={r['params'].get(k, '')}" for k in keys) or "the same params")
            for r in runs]
    with_bpb = [r for r in runs if r["bpb"] is not None]
    blocks.append(Text(
        f"The {len(runs)} newest runs of the experiment{'' if len(runs) < RUNS_SHOWN else ' (older ones: make ui)'}"
        f", with their val bits per byte and the params that differ between them"
        + (f" ({', '.join(f'`{k}`' for k in keys[:8])}{', ...' if len(keys) > 8 else ''})" if keys else
           " (none: they share every param)") + "."))
    blocks.append(Table(("run", "status", "val bpb", "params that differ"), rows))
    if with_bpb:
        best = min(with_bpb, key=lambda r: r["bpb"])
        figures.bars([(r["name"] or r["id"][:8]) for r in with_bpb], [r["bpb"] for r in with_bpb],
                      "val bits per byte (lower is better)", "runs of the experiment", figure_dir / "runs.png")
        blocks += [Figure("figures/runs.png", "Val bits per byte of each run (eval/val_bpb where the run was "
                                              "evaluated, else the training's estimate)."),
                   Text(f"The best so far is {best['name'] or best['id'][:8]} at {best['bpb']:.4f} bits per byte.")]
    return Chapter("experiments", "Your experiments", blocks)
