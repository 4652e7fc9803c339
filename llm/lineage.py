"""What a training run trained on, on what, and what changed: its input datasets (the token shards by DVC's hash, the
tokenizer by its sha256), the code (git commit, whether the tree was dirty), the upstream stages' outputs as dvc.lock
records them, the params that differ from the committed params file (which name the run), and a run card of the
machine. Described here as plain values; llm/tracking.py logs them to MLflow (only it imports mlflow).

dvc.lock's one reader is here (read_lock)."""

import dataclasses
import hashlib
import json
import os
import platform
import posixpath
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from llm.project import dirty_files, git_output, workspace_root
from llm.shards import TokensMeta

# MLflow's longest dataset digest (its database column); DVC's folder hash is 32 hex digits and ".dir": 36.
MAX_DIGEST = 36
# A run name longer than this is cut at a whole change, with how many more there are: the runs table shows ~40.
MAX_RUN_NAME = 60
# MLflow's longest tag value.
MAX_TAG = 5000
# dvc.lock changes under `dvc repro` as each stage ends: a record of what ran, not an input, so it does not make the
# tree dirty.
NOT_DIRTYING = ("dvc.lock",)
# The key a stage's metrics JSON holds its wall time under, where it records one.
WALL_KEY = "wall_seconds"
ABSENT = "(absent)"  # a key one of the two params files does not have
# What changed from the committed params file: dotted key -> (committed value, current value).
ParamChanges = dict[str, tuple[Any, Any]]


# --- DVC's hashes and dvc.lock --------------------------------------------------------------------------------------

def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def dir_md5(entries: Iterable[tuple[str, str]]) -> str:
    """DVC's hash of a folder from its files' (relative posix path, md5): the md5 of the sorted listing as DVC
    serialises it (dvc_data's Tree.as_bytes), and ".dir"."""
    listing = sorted(({"md5": md5, "relpath": relpath} for relpath, md5 in entries), key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(listing, sort_keys=True).encode(), usedforsecurity=False).hexdigest() + ".dir"


def folder_md5s(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative posix path -> md5), as DVC hashes them."""
    folder = Path(folder)
    return {posixpath.join(*p.relative_to(folder).parts): file_md5(p)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def dvc_hash(path: Path) -> str:
    """DVC's hash of a file or a folder (what dvc.lock records as its md5): the same bytes give the same hash."""
    path = Path(path)
    return dir_md5(folder_md5s(path).items()) if path.is_dir() else file_md5(path)


@dataclasses.dataclass(frozen=True)
class LockedStage:
    """One stage of dvc.lock: the md5 of each dep and out, by path (relative to the repository)."""

    deps: dict[str, str]
    outs: dict[str, str]


def read_lock(path: Path) -> dict[str, LockedStage]:
    """dvc.lock's stages by name; empty when there is none or it cannot be read (lineage is a record, never a reason
    to stop a training)."""
    try:
        stages = yaml.safe_load(Path(path).read_text()).get("stages") or {}
        return {name: LockedStage(*({e["path"]: str(e.get("md5", "")) for e in stage.get(part) or []}
                                    for part in ("deps", "outs")))
                for name, stage in stages.items()}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError, KeyError, TypeError):
        return {}


def upstream_stages(lock: dict[str, LockedStage], inputs: Iterable[str]) -> dict[str, LockedStage]:
    """The locked stages whose outputs `inputs` (paths relative to the repository) come from, directly or not."""
    wanted, found = set(inputs), {}
    while True:
        more = {name: stage for name, stage in lock.items() if name not in found and wanted & stage.outs.keys()}
        if not more:
            return found
        found.update(more)
        wanted |= {dep for stage in more.values() for dep in stage.deps}


# --- the datasets ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InputDataset:
    """A dataset a run reads, as MLflow records it (mlflow.entities.Dataset, with its context as an input tag)."""

    name: str
    digest: str  # at most MAX_DIGEST characters
    source: str  # where it is: a file URI
    context: str  # "training", "validation", "tokenizer"
    profile: dict[str, Any]  # what MLflow shows beside it: token counts


def token_datasets(tokens: Path, meta: TokensMeta, tokenizer: Path) -> list[InputDataset]:
    """The token shards a training reads: the folder as a whole (DVC's hash of it, computed as DVC does: what
    dvc.lock records for the tokenize stage's output when that is current), the val split alone (val_dataset) and
    `tokenizer`, which made them (its sha256, as meta.json records it and the train stage checked). Reads every
    shard once: at disk speed, small beside any training."""
    tokens = Path(tokens).resolve()
    md5s = folder_md5s(tokens)
    counts = {f"{split}_{what}": getattr(part, what)
              for split, part in meta.splits.items() for what in ("tokens", "documents", "bytes")}
    return [
        InputDataset("tokens", dir_md5(md5s.items()), tokens.as_uri(), "training",
                     {**counts, "vocab_size": meta.vocab_size, "dtype": meta.dtype, "files": len(md5s)}),
        val_dataset(tokens, meta, md5s),
        InputDataset("tokenizer", meta.tokenizer_sha256[:MAX_DIGEST], Path(tokenizer).resolve().as_uri(), "tokenizer",
                     {"sha256": meta.tokenizer_sha256, "vocab_size": meta.vocab_size}),
    ]


def val_dataset(tokens: Path, meta: TokensMeta, md5s: dict[str, str] | None = None) -> InputDataset:
    """The val split as a training run records it: digest = DVC's hash its shards would have as a folder of their own,
    so it changes exactly when a val shard does (what evaluations link their metrics to, and compare on). `md5s`:
    the folder's files' md5s, when already computed."""
    tokens = Path(tokens).resolve()
    val = meta.splits["val"]
    digest = dir_md5((name, md5s[name] if md5s else file_md5(tokens / name)) for name in val.shards)
    return InputDataset("tokens/val", digest, tokens.as_uri(), "validation",
                        {"tokens": val.tokens, "documents": val.documents, "bytes": val.bytes,
                         "shards": len(val.shards)})


# --- the code and the workspace -------------------------------------------------------------------------------------

def baseline_rev() -> str:
    """The commit a run's params are compared with: the experiment's baseline under `dvc exp run` (DVC sets
    DVC_EXP_BASELINE_REV), else HEAD."""
    return os.environ.get("DVC_EXP_BASELINE_REV") or "HEAD"


def committed_text(path: Path) -> str | None:
    """The file at `path` as committed at baseline_rev(); None outside git or when it is not committed there."""
    path = Path(path).resolve()
    return git_output(path.parent, "show", f"{baseline_rev()}:./{path.name}")


# --- what changed: the run's name -----------------------------------------------------------------------------------

def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 0.01}} -> {"train.lr": 0.01}."""
    out = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_params(current: dict[str, Any], committed: dict[str, Any]) -> ParamChanges:
    """The params (dotted keys) whose value differs between two params files as written: key -> (committed,
    current), ABSENT for a key one of them lacks."""
    now, before = flatten(current), flatten(committed)
    return {key: (before.get(key, ABSENT), now.get(key, ABSENT))
            for key in sorted(now.keys() | before.keys()) if before.get(key, ABSENT) != now.get(key, ABSENT)}


def tag_key(key: str) -> str:
    """`key` as an MLflow tag may be named (letters, digits, _ - . / and spaces): a params key or a path of anything
    else would make MLflow refuse the run's tags, and the run with them."""
    return posixpath.normpath(re.sub(r"[^\w\-./ ]", "_", key)).lstrip("/")[:250]


def shown_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def run_name(changes: ParamChanges | None, experiment: str | None = None) -> str | None:
    """What a run is called: the DVC experiment's name under `dvc exp run`; else what changed from the committed
    params (`lr=0.004 vocab_size=4096`: the last part of each key, the whole key where two changes share it), cut
    after MAX_RUN_NAME characters at a whole change (`+2 more`); `baseline` when nothing did. None when there is no
    committed params file to compare with (MLflow then picks a name)."""
    if experiment:
        return experiment
    if changes is None:
        return None
    if not changes:
        return "baseline"
    last = [key.rsplit(".", 1)[-1] for key in changes]
    parts = [f"{key if last.count(short) > 1 else short}={shown_value(new)}"
             for (key, (_, new)), short in zip(changes.items(), last, strict=True)]
    name = parts[0][:MAX_RUN_NAME]
    for count, part in enumerate(parts[1:], start=1):
        more = f" +{len(parts) - count} more"
        if len(name) + 1 + len(part) + (len(more) if count < len(parts) - 1 else 0) > MAX_RUN_NAME:
            return name + more
        name += " " + part
    return name


def change_tags(changes: ParamChanges | None) -> dict[str, str]:
    """One tag per changed param, `params_changed.train.lr`: "0.016 -> 0.004"; and how many changed."""
    if changes is None:
        return {"params_changed": "unknown: no committed params file to compare with"}
    tags = {tag_key(f"params_changed.{key}"): f"{shown_value(old)} -> {shown_value(new)}"[:MAX_TAG]
            for key, (old, new) in changes.items()}
    return {"params_changed": str(len(changes)), **tags}


# --- the run card ---------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's marketing name (Linux's /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@dataclasses.dataclass(frozen=True)
class RunCard:
    """The machine and software a training ran on, and how long each stage took where its metrics say."""

    cpu_model: str
    cpu_bf16: bool  # the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX): llm.train.has_fast_bf16
    cpu_cores: int  # logical cores the process may use
    gpu: str  # its name; "none"
    device: str  # the training's: "cpu", "cuda"
    dtype: str  # the training's resolved dtype
    world_size: int
    torch: str
    python: str
    stage_seconds: dict[str, float]  # wall time per upstream stage, from its metrics JSON (WALL_KEY)

    def tags(self) -> dict[str, str]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "stage_seconds"}
        tags = {f"card.{k}": str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
        tags.update({f"card.wall_seconds.{stage}": f"{s:.1f}" for stage, s in self.stage_seconds.items()})
        return tags

    def markdown(self, train_seconds: float | None = None, stage: str = "train") -> str:
        rows = [("CPU", self.cpu_model), ("CPU bf16 in hardware", "yes" if self.cpu_bf16 else "no"),
                ("CPU cores", str(self.cpu_cores)), ("GPU", self.gpu), ("device", self.device),
                ("dtype", self.dtype), ("processes", str(self.world_size)), ("torch", self.torch),
                ("Python", self.python)]
        times = {**self.stage_seconds, **({stage: train_seconds} if train_seconds is not None else {})}
        lines = ["# Run card", "", "| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows), "",
                 "## Wall time per stage", ""]
        if times:
            lines += ["| stage | seconds |", "| --- | ---: |", *(f"| {k} | {v:.1f} |" for k, v in times.items())]
        else:
            lines.append("No stage recorded its wall time.")
        return "\n".join(lines) + "\n"


def stage_seconds(root: Path, stages: dict[str, LockedStage]) -> dict[str, float]:
    """Each stage's wall time, where a JSON output of it (its metrics) records WALL_KEY."""
    seconds = {}
    for name, stage in stages.items():
        for out in stage.outs:
            if not out.endswith(".json"):
                continue
            try:
                value = json.loads((root / out).read_text()).get(WALL_KEY)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if isinstance(value, int | float):
                seconds[name] = float(value)
    return seconds


def run_card(device: str, dtype: str, world_size: int, cpu_bf16: bool, stage_times: dict[str, float]) -> RunCard:
    """This machine's card; `cpu_bf16` as llm.train.has_fast_bf16 finds for the CPU."""
    import torch

    gpu = torch.cuda.get_device_name() if device == "cuda" and torch.cuda.is_available() else "none"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return RunCard(cpu_model(), cpu_bf16, cores, gpu, device, dtype, world_size,
                   torch.__version__, platform.python_version(), stage_times)


# --- all of it, for one training ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Lineage:
    """What tracking records of a training beside its params: the name, datasets, tags and card."""

    name: str | None
    datasets: list[InputDataset]
    tags: dict[str, str]
    card: RunCard


def training_lineage(tokens: Path, tokenizer: Path, meta: TokensMeta, changes: ParamChanges | None,
                     device: str, dtype: str, world_size: int, cpu_bf16: bool) -> Lineage:
    """The lineage of a training on the shards in `tokens` (made with `tokenizer`); `changes` are the params that
    differ from the committed params file (changed_params; None when there is none to compare with)."""
    return _lineage([tokens, tokenizer], token_datasets(tokens, meta, tokenizer), changes, device, dtype, world_size,
                    cpu_bf16)


def tuning_lineage(inputs: list[Path], changes: ParamChanges | None, device: str, dtype: str,
                   cpu_bf16: bool) -> Lineage:
    """The lineage of an instruction tuning that read `inputs` (the base model's folder, the cleaned corpus): its
    name, the git and dvc.lock tags of those inputs and the card, as a training's; no token datasets (it reads no
    shards: its conversations are identified in its checkpoint's fingerprint)."""
    return _lineage(inputs, [], changes, device, dtype, 1, cpu_bf16)


def _lineage(inputs: list[Path], datasets: list[InputDataset], changes: ParamChanges | None, device: str,
             dtype: str, world_size: int, cpu_bf16: bool) -> Lineage:
    root = workspace_root()
    lock = read_lock(root / "dvc.lock")
    upstream = upstream_stages(lock, [_relative(p, root) for p in inputs])
    dirty = dirty_files(root, NOT_DIRTYING)
    outputs = {tag_key(f"dvc.{name}.{out}"): md5 for name, stage in upstream.items() for out, md5 in stage.outs.items()}
    tags = {"git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
            **({"git_dirty_files": " ".join(dirty)[:MAX_TAG]} if dirty else {}), **outputs, **change_tags(changes)}
    card = run_card(device, dtype, world_size, cpu_bf16, stage_seconds(root, upstream))
    return Lineage(run_name(changes, os.environ.get("DVC_EXP_NAME")), datasets, {**tags, **card.tags()}, card)


def _relative(path: Path, root: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()
