"""The guide stage: load the run, write every chapter's figures and the HTML and PDF into reports/guide/
(replaced whole, atomically), and log the folder to the MLflow run that trained the model."""

import logging
import time
from pathlib import Path

from llm.fileio import atomic_dir
from llm.guide.data_chapters import corpus, shards_chapter, tokenizer_chapter
from llm.guide.document import Chapter, write_html, write_pdf
from llm.guide.evolution_chapter import evolution_chapter
from llm.guide.experiments_chapter import with_experiments
from llm.guide.inputs import GuidePaths, GuideSettings, Run, load_run
from llm.guide.intro_chapter import intro_chapter
from llm.guide.model_chapters import attention_chapter, model_chapter
from llm.guide.run_chapters import generation_chapter, training_chapter
from llm.guide.sft_chapter import sft_chapter
from llm.tracking import Job, run_of_model

log = logging.getLogger(__name__)

TITLE = "How your language model was made"


def chapters(run: Run, figure_dir: Path, run_id: str | None) -> list[Chapter]:
    """The eleven chapters: what a language model is, then the pipeline's stages in order; each writes its
    figures into `figure_dir`. The first is made last, since its reading path lists the others' exercises."""
    made = []
    for build in (corpus, tokenizer_chapter, shards_chapter, model_chapter, attention_chapter, evolution_chapter,
                  training_chapter, generation_chapter, sft_chapter):
        start = time.perf_counter()
        made.append(build(run, figure_dir))
        log.info("chapter %d, %s: %.1f s", len(made), made[-1].title, time.perf_counter() - start)
    made = with_experiments(made, run, figure_dir, run_id)  # and every exercise's result from the runs
    start = time.perf_counter()
    made.insert(0, intro_chapter(run, figure_dir, made))
    log.info("chapter 1, %s: %.1f s", made[0].title, time.perf_counter() - start)
    return made


def subtitle(run: Run) -> str:
    cfg, metrics = run.model.config, run.train_metrics
    return (f"A {cfg.arch} transformer of {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd}, "
            f"{run.model.num_params():,} parameters, trained {metrics['steps']:,} steps on "
            f"{metrics['tokens_seen']:,} tokens of `{run.settings.data.source}`: "
            f"{run.eval_metrics['val_bpb']:.4f} bits per byte on held-out text. Every number and figure below "
            "comes from this run's own files.")


def build_guide(paths: GuidePaths, settings: GuideSettings) -> list[Path]:
    """Write reports/guide/ (index.html, guide.pdf, attention_evolution.gif, figures/); return its files."""
    run = load_run(paths, settings)
    tracked = run_of_model(paths.model, settings.mlflow, Job("guide", str(paths.out)))
    with atomic_dir(paths.out) as staging:
        figure_dir = staging / "figures"
        figure_dir.mkdir()
        made = chapters(run, figure_dir, run.eval_metrics.get("mlflow_run_id"))
        write_html(staging / "index.html", TITLE, subtitle(run), made)
        write_pdf(staging / "guide.pdf", staging, TITLE, subtitle(run), made)
    files = sorted(p for p in paths.out.rglob("*") if p.is_file())
    log.info("wrote %s: %d chapters, %d files", paths.out, len(made), len(files))
    tracked.log_artifact(paths.out, "guide")
    tracked.finish()
    return files
