"""Chapter 10: the experiments, the training runs of the MLflow experiment side by side: the params that differ
between them, their val bits per byte, what a sweep of one param found and whether repeats of one config agree.
Also the reader's results of every chapter's exercises (`with_exercise_results`), found among the same runs.

A run's params are compared as its config classes read them (llm/configs/): a value recorded as text is parsed,
coerced and resolved as params.yaml would be (`('a', 'b')` and `['a', 'b']` are one value; a model part left null
is its preset's), and a param a run did not record (it is older than the param) counts as its default."""

import ast
import dataclasses
import logging
import statistics
import typing
from pathlib import Path
from typing import Any, Literal

from llm.config import from_mapping
from llm.configs.clean import CleanConfig
from llm.configs.data import DataConfig
from llm.configs.evaluate import EvaluateConfig
from llm.configs.mlflow import MlflowConfig
from llm.configs.model import ModelConfig
from llm.configs.sft import SFTConfig
from llm.configs.tokenize import TokenizeConfig
from llm.configs.tokenizer import TokenizerConfig
from llm.configs.train import TrainConfig
from llm.errors import ConfigError, first_line
from llm.guide.document import Chapter, Exercise, Figure, Table, Text
from llm.guide.inputs import Run
from llm.plots import plt, save_figure
from llm.project import project_root
from llm.tracking import RunSummary, newest_runs, resolve_tracking_uri

log = logging.getLogger(__name__)

# The params sections a run records, as stages/params.py's SECTIONS; each read by its config class.
CONFIGS: dict[str, type] = {"data": DataConfig, "clean": CleanConfig, "tokenizer": TokenizerConfig,
                            "tokenize": TokenizeConfig, "model": ModelConfig, "train": TrainConfig,
                            "evaluate": EvaluateConfig, "sft": SFTConfig, "mlflow": MlflowConfig}
RUNS_READ = 200  # the newest runs looked at: sweeps, repeats and exercises are found among them
RUNS_SHOWN = 20  # the newest training runs in the table and the chart (and this run, if older)
SEED_PARAMS = ("train.seed",)  # runs that differ only in these repeat one config: their spread is the noise
PARAM_COLUMNS = 4  # differing params shown as columns of their own; more go into one column
BPB_METRIC = "eval/val_bpb"  # the evaluate stage's, over every val token


@dataclasses.dataclass(frozen=True)
class ExperimentRun:
    """One MLflow run, its params as its config classes read them."""

    name: str
    run_id: str
    status: str  # RUNNING, FINISHED, FAILED, KILLED
    stage: str  # "train", or "sft" for the sft stage's runs (tagged stage=sft)
    params: dict[str, Any]  # "section.key" -> value, every key of every section
    metrics: dict[str, float]  # the last value of each

    @property
    def val_bpb(self) -> float | None:
        return self.metrics.get(BPB_METRIC)

    @property
    def finished(self) -> bool:
        """Trained to the end and evaluated: only such runs are compared."""
        return self.status == "FINISHED" and self.val_bpb is not None

    def state(self) -> str:
        """The run's status in words: what keeps it out of the comparisons, if anything."""
        if self.status != "FINISHED":
            return f"{self.status.lower()} (unfinished)"
        return "finished" if self.val_bpb is not None else "not evaluated (unfinished)"


# --- params, as the config classes read them ---------------------------------------------------------------

def _field_kinds(cls: type) -> dict[str, Any]:
    return {field.name: typing.get_type_hints(cls)[field.name] for field in dataclasses.fields(cls)}


def _is_text(kind: Any) -> bool:
    """A field whose values are strings (str, or a Literal of strings), optional or not."""
    options = [k for k in typing.get_args(kind) if k is not type(None)] if typing.get_origin(kind) in (
        typing.Union, type(int | None)) else [kind]
    return all(k is str or (typing.get_origin(k) is Literal and all(isinstance(a, str) for a in typing.get_args(k)))
               for k in options)


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def recorded_value(text: str, kind: Any) -> Any:
    """A param as MLflow recorded it (the Python value's str) back as a value of field type `kind`."""
    if text == "None":
        return None
    if _is_text(kind):
        return text
    try:
        return _tuples(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def section_values(cls: type, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` (some keys of a section) as the config class reads them: missing keys at their defaults, parts
    left null resolved. Values the class refuses (a run of an older version) are kept as given, over the
    defaults, so that the run is still shown."""
    try:
        return dataclasses.asdict(from_mapping(cls, values, section, require_all=False))
    except (ConfigError, TypeError):
        defaults = {field.name: field.default for field in dataclasses.fields(cls)}
        return {**defaults, **values}


def run_params(recorded: dict[str, str]) -> dict[str, Any]:
    """Every param of a run ("section.key" -> value) from what MLflow recorded: each section's keys read by its
    config class, a key the run did not record at its default. Recorded keys that are no param (git_commit,
    data_tokenizer_sha256) are left out; a key the config classes no longer know is kept as recorded."""
    params: dict[str, Any] = {}
    for section, cls in CONFIGS.items():
        kinds = _field_kinds(cls)
        given = {key.split(".", 1)[1]: text for key, text in recorded.items() if key.startswith(f"{section}.")}
        known = {key: recorded_value(text, kinds[key]) for key, text in given.items() if key in kinds}
        params.update({f"{section}.{key}": value for key, value in section_values(cls, section, known).items()})
        params.update({f"{section}.{key}": text for key, text in given.items() if key not in kinds})
    params.update({key: text for key, text in recorded.items() if "." in key and key.split(".")[0] not in CONFIGS})
    return params


def override_value(key: str, text: str) -> Any:
    """A value as `dvc exp run -S key=value` sets it: DVC reads the value with Hydra's override grammar (`1e-3` a
    number, `true` a bool, `[a, b]` a list, `null` None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser  # DVC's dependency; slow to import

    return _tuples(OverridesParser.create().parse_override(f"{key}={text}").value())


def with_overrides(params: dict[str, Any], overrides: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """The params of a run of `params` with `overrides` set, as `dvc exp run -S key=value` sets them (the value
    read as YAML) and the config classes then read them: a part that followed its preset (or n_kv_head that
    followed n_head) follows the new value too, a part set explicitly stays."""
    changed = dict(params)
    for section in {key.split(".", 1)[0] for key, _ in overrides}:
        cls = CONFIGS.get(section)
        values = {key.split(".", 1)[1]: value for key, value in params.items() if key.startswith(f"{section}.")}
        set_here = {key.split(".", 1)[1]: override_value(key, text) for key, text in overrides
                    if key.startswith(f"{section}.")}
        if cls is None:
            changed.update({f"{section}.{key}": value for key, value in set_here.items()})
            continue
        nullable = {field.name for field in dataclasses.fields(cls) if field.default is None}
        resolved = section_values(cls, section, {k: v for k, v in values.items() if k not in nullable})
        kept = {k: v for k, v in values.items() if k not in nullable or v != resolved.get(k)}
        changed.update({f"{section}.{key}": value
                        for key, value in section_values(cls, section, {**kept, **set_here}).items()})
    return changed


def shown_value(value: Any) -> str:
    if value is None:
        return "-"
    text = ", ".join(map(str, value)) if isinstance(value, tuple) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


# --- the runs ------------------------------------------------------------------------------------------------

def experiment_run(summary: RunSummary) -> ExperimentRun:
    return ExperimentRun(summary.name or summary.run_id[:8], summary.run_id, summary.status,
                         summary.tags.get("stage", "train"), run_params(summary.params), dict(summary.metrics))


def read_runs(settings: MlflowConfig) -> list[ExperimentRun]:
    """The newest RUNS_READ runs of the experiment, newest first; raises when MLflow cannot be used."""
    uri = resolve_tracking_uri(settings.tracking_uri, project_root())
    return [experiment_run(summary) for summary in newest_runs(uri, settings.experiment, RUNS_READ)]


def _key(params: dict[str, Any], left_out: tuple[str, ...] = ()) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items() if k not in left_out))


def differing_params(runs: list[ExperimentRun]) -> list[str]:
    """The params whose value is not the same in every run (a run that lacks one has its default)."""
    keys = sorted({key for run in runs for key in run.params})
    return [key for key in keys if len({repr(run.params.get(key)) for run in runs}) > 1]


def charted(runs: list[ExperimentRun]) -> list[ExperimentRun]:
    """The runs the chart and the comparisons take: finished and evaluated."""
    return [run for run in runs if run.finished]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Finished runs that share every param but one, holding at least two values of it."""

    param: str
    runs: list[ExperimentRun]

    def by_value(self) -> list[tuple[Any, list[float]]]:
        """(value, the val bpb of each run with it), the values in order."""
        values: dict[str, tuple[Any, list[float]]] = {}
        for run in self.runs:
            values.setdefault(repr(run.params[self.param]), (run.params[self.param], []))[1].append(run.val_bpb)
        pairs = list(values.values())
        return sorted(pairs, key=lambda pair: pair[0]) if _numeric([v for v, _ in pairs]) else pairs

    def best(self) -> tuple[Any, float]:
        """The value with the lowest mean val bpb, and that mean."""
        return min(((value, statistics.fmean(bpbs)) for value, bpbs in self.by_value()), key=lambda pair: pair[1])


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def sweeps(runs: list[ExperimentRun]) -> list[Sweep]:
    """For each param (seeds aside), the largest set of finished runs that differ only in it and hold at least
    two of its values: a sweep of that param."""
    finished = charted(runs)
    found = []
    for param in differing_params(finished):
        if param in SEED_PARAMS:
            continue
        groups: dict[tuple, list[ExperimentRun]] = {}
        for run in finished:
            groups.setdefault(_key(run.params, (param,)), []).append(run)
        swept = [group for group in groups.values() if len({repr(r.params[param]) for r in group}) >= 2]
        if swept:
            found.append(Sweep(param, max(swept, key=len)))
    return found


def repeats(runs: list[ExperimentRun]) -> list[list[ExperimentRun]]:
    """Sets of two or more finished runs of one config (the same params, seeds aside), largest first."""
    groups: dict[tuple, list[ExperimentRun]] = {}
    for run in charted(runs):
        groups.setdefault(_key(run.params, SEED_PARAMS), []).append(run)
    return sorted((group for group in groups.values() if len(group) >= 2), key=len, reverse=True)


# --- what the runs say ---------------------------------------------------------------------------------------

def _config_means(runs: list[ExperimentRun]) -> list[float]:
    """The mean val bpb of each config (seeds aside) among the finished runs."""
    groups: dict[tuple, list[float]] = {}
    for run in charted(runs):
        groups.setdefault(_key(run.params, SEED_PARAMS), []).append(run.val_bpb)
    return [statistics.fmean(bpbs) for bpbs in groups.values()]


def _listed(values: list[str]) -> str:
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def sweep_takeaway(sweep: Sweep, noise: float | None) -> str:
    """The best value of a swept param, the worst, and whether the best's lead is more than the noise of a run."""
    by_value = [(value, statistics.fmean(bpbs)) for value, bpbs in sweep.by_value()]
    (best, best_bpb) = sweep.best()
    (worst, worst_bpb) = max(by_value, key=lambda pair: pair[1])
    mean = " (the mean where a value has several runs)" if any(len(bpbs) > 1 for _, bpbs in sweep.by_value()) else ""
    text = (f"`{sweep.param}` was swept over {_listed([shown_value(v) for v, _ in by_value])} in {len(sweep.runs)} "
            f"runs that differ only in it: the lowest val bpb{mean}, "
            f"{best_bpb:.4f}, came at {shown_value(best)}; the highest, {worst_bpb:.4f}, at {shown_value(worst)}.")
    values = [v for v, _ in by_value]
    if len(values) >= 3 and _numeric(values) and best in (values[0], values[-1]):
        text += " The best is at the edge of the values tried: one beyond it may be better still."
    if noise is not None:
        lead = sorted(bpb for _, bpb in by_value)[1] - best_bpb
        text += (f" Its lead over the next value, {lead:.4f}, is {'more' if lead > noise else 'no more'} than the "
                 f"spread of repeated runs ({noise:.4f}){'' if lead > noise else ': it may be noise'}.")
    return text


def repeat_takeaway(group: list[ExperimentRun], between_configs: float | None) -> str:
    """Whether runs of one config agree: their spread against the differences between configs."""
    bpbs = [run.val_bpb for run in group]
    spread = max(bpbs) - min(bpbs)
    seeds = sorted({run.params.get("train.seed") for run in group}, key=repr)
    names = _listed([f"`{run.name}`" for run in group])
    seed_text = (f"the same `train.seed` ({seeds[0]})" if len(seeds) == 1 else
                 f"`train.seed` {_listed([str(s) for s in seeds])}")
    if spread == 0:
        text = f"{names} repeat one config with {seed_text} and gave the same val bpb, {bpbs[0]:.4f}, to every digit"
        return text + (": training is deterministic here, so a repeat with the same seed measures no noise; one "
                       "with another `train.seed` does." if len(seeds) == 1 else ".")
    text = f"{names} repeat one config with {seed_text}: their val bpb spread over {spread:.4f}"
    if between_configs is None:
        return text + "."
    if 2 * spread < between_configs:
        return text + (f", small next to the {between_configs:.4f} between the best and the worst config: runs of "
                       "one config agree, and the differences between configs are more than noise.")
    return text + (f", as much as the {between_configs:.4f} between the best and the worst config: the differences "
                   "between configs may be noise; repeat a config with other seeds before trusting them.")


def takeaway(runs: list[ExperimentRun]) -> list[str]:
    """What the finished runs say, in sentences: each sweep's best value, and whether repeats agree."""
    groups = repeats(runs)
    spreads = [max(r.val_bpb for r in g) - min(r.val_bpb for r in g) for g in groups]
    noise = max(spreads) if spreads else None
    means = _config_means(runs)
    between = max(means) - min(means) if len(means) >= 2 else None
    lines = [sweep_takeaway(sweep, noise) for sweep in sweeps(runs)]
    lines += [repeat_takeaway(group, between) for group in groups[:3]]
    return lines


# --- figures -------------------------------------------------------------------------------------------------

def _zoomed(values: list[float]) -> tuple[float, float]:
    """Axis limits around `values` with a margin: the axis shows their differences, not their distance from 0."""
    low, high = min(values), max(values)
    margin = max(high - low, 0.002 * abs(high) or 0.01) * 0.25
    return low - margin, high + margin * 2.5  # room on the right for each point's value


def runs_figure(runs: list[ExperimentRun], labels: list[str], this_id: str | None, path: Path) -> None:
    """Each finished run's val bpb as a point on one row, best at the top, on an axis zoomed to their range."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].val_bpb)
    fig, ax = plt.subplots(figsize=(7, 1.1 + 0.32 * len(runs)))
    rows = list(range(len(runs)))[::-1]
    for row, i in zip(rows, order, strict=True):
        mine = runs[i].run_id == this_id
        ax.plot([runs[i].val_bpb], [row], "o", color="#c44e52" if mine else "#4c72b0", markersize=7)
        ax.annotate(f"{runs[i].val_bpb:.4f}", (runs[i].val_bpb, row), xytext=(6, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(rows, [labels[i] for i in order], fontsize=8)
    ax.set_xlim(*_zoomed([run.val_bpb for run in runs]))
    ax.set_ylim(-0.7, len(runs) - 0.3)
    ax.set_xlabel("val bits per byte (lower is better; the axis spans the runs' range, not from 0)", fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def sweeps_figure(found: list[Sweep], path: Path) -> None:
    """A panel per swept param: each run's val bpb against the param's value, a line through each value's mean,
    the best value marked."""
    columns = min(len(found), 2)
    rows = (len(found) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.5 * columns, 3.0 * rows), squeeze=False)
    for ax, sweep in zip(axes.flat, found, strict=False):
        by_value = sweep.by_value()
        values = [value for value, _ in by_value]
        numeric = _numeric(values)
        xs = values if numeric else list(range(len(values)))
        for x, (_, bpbs) in zip(xs, by_value, strict=True):
            ax.plot([x] * len(bpbs), bpbs, "o", color="#4c72b0", alpha=0.6, markersize=5)
        means = [statistics.fmean(bpbs) for _, bpbs in by_value]
        ax.plot(xs, means, "-", color="#4c72b0", linewidth=1)
        best = means.index(min(means))
        ax.plot([xs[best]], [means[best]], "*", color="#c44e52", markersize=12,
                label=f"best: {shown_value(values[best])}")
        if numeric and min(values) > 0 and max(values) / min(values) >= 4:
            ax.set_xscale("log")  # a learning rate is swept by factors
        ax.set_xticks(xs, [shown_value(v) for v in values], fontsize=8)  # the values tried, written as in params
        ax.minorticks_off()
        ax.set_xlabel(sweep.param, fontsize=8)
        ax.set_ylabel("val bits per byte", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.set_title(f"{len(sweep.runs)} runs differing only in {sweep.param}", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(found):]:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)


# --- the chapter ---------------------------------------------------------------------------------------------

INTRO = ("Every training is an MLflow run in the experiment `{experiment}` at `{uri}`, with all its params, its "
         "metrics at every log step, the model, and the evaluation and this guide as artifacts. `make ui` serves the "
         "MLflow UI on http://127.0.0.1:5000: select runs and press Compare to see their params side by side and "
         "their loss curves on one chart. `dvc exp run -S key=value` trains a variant as a new run; `dvc exp show` "
         "lists them in the terminal.")


def shown_runs(runs: list[ExperimentRun], this_id: str | None) -> list[ExperimentRun]:
    """The newest RUNS_SHOWN training runs, and this run if it is older."""
    training = [run for run in runs if run.stage == "train"]
    shown = training[:RUNS_SHOWN]
    return shown + [run for run in training[RUNS_SHOWN:] if run.run_id == this_id]


def runs_table(runs: list[ExperimentRun], keys: list[str], this_id: str | None) -> Table:
    """A row per run: its status, val bpb and the params that differ (a column each for the first few)."""
    columns, rest = keys[:PARAM_COLUMNS], keys[PARAM_COLUMNS:]
    header = ("run", "status", "val bpb", *columns, *(("other params that differ",) if rest else ()))
    rows = [(run.name + (" (this run)" if run.run_id == this_id else ""), run.state(),
             f"{run.val_bpb:.4f}" if run.val_bpb is not None else "-",
             *(shown_value(run.params.get(key)) for key in columns),
             *(("; ".join(f"{key}={shown_value(run.params.get(key))}" for key in rest),) if rest else ()))
            for run in runs]
    return Table(header, rows)


def chart_label(run: ExperimentRun, this: ExperimentRun | None) -> str:
    """A run's name and how its params differ from this run's (the first two)."""
    if this is None or run.run_id == this.run_id:
        return run.name + (" (this run)" if this is not None else "")
    changed = differing_params([run, this])
    shown = ", ".join(f"{key.split('.', 1)[-1]}={shown_value(run.params.get(key))}" for key in changed[:2])
    text = (f"{run.name}: {shown}{f' +{len(changed) - 2}' if len(changed) > 2 else ''}" if changed
            else f"{run.name}: the same params")
    return text if len(text) <= 50 else text[:47] + "..."


def experiment_exercises(run: Run) -> list[Exercise]:
    """A half learning rate (the sweep this chapter plots) and another seed (the noise it measures)."""
    cfg = run.settings.train
    (key, lr) = ("train.muon_lr", cfg.muon_lr) if cfg.optimizer == "muon" else ("train.lr", cfg.lr)
    half = f"{lr / 2:g}"
    return [
        Exercise(f"dvc exp run -S {key}={half}",
                 f"This chapter once the guide is rebuilt: the table, the chart, and the plot of val bpb against "
                 f"`{key}`.",
                 f"A new run at half this run's {lr:g}. With this run it is a sweep of `{key}`: the chapter plots val "
                 f"bpb against it and names the better value.", ((key, half),)),
        Exercise(f"dvc exp run -S train.seed={cfg.seed + 1}",
                 "The sentence on repeated runs below the chart.",
                 "The same config trained from other initial weights and batches: its val bpb differs from this "
                 "run's by the noise of a run, the yardstick for every other difference in the table.",
                 (("train.seed", str(cfg.seed + 1)),)),
    ]


def runs_blocks(runs: list[ExperimentRun], this_id: str | None, figure_dir: Path) -> list:
    """The table of the runs, the chart of the finished ones, each sweep's plot and the takeaway."""
    this = next((r for r in runs if r.run_id == this_id), None)
    keys = differing_params(runs)
    unfinished = [r for r in runs if not r.finished]
    older = " (older ones: make ui)" if len(runs) >= RUNS_SHOWN else ""
    blocks: list = [Text(
        ("The one training run of the experiment so far, with its val bits per byte" if len(runs) == 1 else
         f"The {len(runs)} newest training runs of the experiment{older}, with their val bits per byte and the "
         "params that differ between them" + (f" ({', '.join(f'`{k}`' for k in keys)})" if keys else
                                              " (none: they share every param)"))
        + ". A param a run did not record (it is older than the param) counts as its default. Runs are compared by "
          "bits per byte, not by loss per token: a run with another tokenizer cuts the same text into other tokens, "
          "but not into other bytes."
        + (f" {len(unfinished)} of them {'is' if len(unfinished) == 1 else 'are'} unfinished (still running, failed, "
           "killed, or not evaluated), marked so in the table and left out of the chart and the comparisons."
           if unfinished else "")),
        runs_table(runs, keys, this_id)]
    finished = charted(runs)
    if finished:
        runs_figure(finished, [chart_label(r, this) for r in finished], this_id, figure_dir / "runs.png")
        blocks.append(Figure("figures/runs.png", "Val bits per byte of each finished run (the evaluate stage's, "
                                                 "over every val token), best at the top; this run in red. The axis "
                                                 "spans the runs' range, so that their differences show."))
    found = sweeps(runs)
    if found:
        sweeps_figure(found, figure_dir / "sweeps.png")
        blocks.append(Figure("figures/sweeps.png", "Val bits per byte against each param that was swept: a point "
                                                   "per run, a line through each value's mean, the best marked."))
    lines = takeaway(runs)
    if lines:
        blocks += [Text("What the runs say:")] + [Text(line) for line in lines]
    elif finished:
        best = min(finished, key=lambda r: r.val_bpb)
        blocks.append(Text(f"The best so far is {best.name} at {best.val_bpb:.4f} bits per byte. No param has been "
                           "swept and no config repeated yet: the exercises below do both."))
    return blocks


def experiments_chapter(run: Run, figure_dir: Path, run_id: str | None,
                        listed: list[ExperimentRun] | Exception) -> Chapter:
    """The chapter on the experiment's runs (`listed`, or the error MLflow answered when they were read)."""
    settings = run.settings.mlflow
    blocks: list = [Text(INTRO.format(experiment=settings.experiment, uri=settings.tracking_uri))]
    if isinstance(listed, Exception):
        uri = resolve_tracking_uri(settings.tracking_uri, project_root())
        blocks.append(Text(f"The runs could not be listed: MLflow at {uri} answered {first_line(listed)}"))
        return Chapter("experiments", "Your experiments", blocks + experiment_exercises(run))
    shown = shown_runs(listed, run_id)
    blocks += runs_blocks(shown, run_id, figure_dir) if shown else [Text("The experiment has no runs yet.")]
    tuned = sum(r.stage == "sft" for r in listed)
    if tuned:
        blocks.append(Text(f"The experiment also holds {tuned} run{'s' if tuned > 1 else ''} of the sft stage "
                           "(the chapter on instruction tuning), scored by task accuracy, not compared here."))
    return Chapter("experiments", "Your experiments", blocks + experiment_exercises(run))


def with_experiments(chapters: list[Chapter], run: Run, figure_dir: Path, run_id: str | None) -> list[Chapter]:
    """`chapters`, then the experiments chapter, every exercise's result filled (`exercise_results`): the runs are
    read once, so that a tracker that does not answer costs one wait. MLflow not usable: the chapter says so, the
    exercises go without results."""
    settings = run.settings.mlflow
    try:
        listed: list[ExperimentRun] | Exception = read_runs(settings)
    except Exception as err:  # a server down or a bad URI: the guide is still built, and says so
        uri = resolve_tracking_uri(settings.tracking_uri, project_root())
        log.warning("MLflow at %s is not usable (%s): the guide lists no runs", uri, first_line(err))
        listed = err
    made = [*chapters, experiments_chapter(run, figure_dir, run_id, listed)]
    if isinstance(listed, Exception):
        return made
    sft_id = run.sft.metrics.get("mlflow_run_id") if run.sft is not None else None
    return exercise_results(made, listed, run_id, sft_id)


# --- the reader's results of every chapter's exercises -------------------------------------------------------

def score(run: ExperimentRun) -> tuple[str, float] | None:
    """What a run is judged by, (name, value), or None while it has none: a training's val bpb; an sft run's
    accuracy on the held-out questions, the mean over its tasks (its metrics `<task>_sft`)."""
    if run.status != "FINISHED":
        return None
    if run.stage == "sft":
        accuracies = [v for k, v in run.metrics.items() if k.endswith("_sft") and not k.startswith("sft_")]
        return ("mean held-out accuracy", statistics.fmean(accuracies)) if accuracies else None
    return ("val bpb", run.val_bpb) if run.val_bpb is not None else None


def exercise_result(exercise: Exercise, this: ExperimentRun | None, runs: list[ExperimentRun]) -> str | None:
    """The newest finished run whose params are this run's with exactly the exercise's overrides set, as what it
    gave beside this run's; None when there is none (or the exercise sets nothing this run does not have)."""
    if not exercise.overrides or this is None or score(this) is None:
        return None
    expected = with_overrides(this.params, exercise.overrides)
    if _key(expected) == _key(this.params):
        return None
    match = next((r for r in runs if r.run_id != this.run_id and r.stage == this.stage and score(r) is not None
                  and _key(r.params) == _key(expected)), None)
    if match is None:
        return None
    (name, value), (_, own) = score(match), score(this)
    digits = 4 if this.stage == "train" else 3
    return f"{name} {value:.{digits}f} (this run's: {own:.{digits}f}), run `{match.name}`"


def exercise_results(chapters: list[Chapter], runs: list[ExperimentRun], train_run_id: str | None,
                     sft_run_id: str | None = None) -> list[Chapter]:
    """The chapters with each exercise's `result` filled where the reader has run it (`exercise_result`): an
    exercise that sets only `sft.` params is looked up among the sft stage's runs, beside the sft run of
    `sft_run_id`; any other among the trainings, beside `train_run_id`."""
    by_id = {run.run_id: run for run in runs}
    made = []
    for chapter in chapters:
        blocks = []
        for block in chapter.blocks:
            if isinstance(block, Exercise) and block.overrides:
                sft = all(key.startswith("sft.") for key, _ in block.overrides)
                this = by_id.get(sft_run_id if sft else train_run_id)
                block = dataclasses.replace(block, result=exercise_result(block, this, runs) or block.result)
            blocks.append(block)
        made.append(dataclasses.replace(chapter, blocks=blocks))
    return made

