"""dvc.yaml lists each stage's code as deps; this checks the lists against the imports, so that a change to any
module a stage runs reruns that stage (a missing dep lets DVC's cache serve a stale result)."""

import ast
import copy
import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

PACKAGES = ("llm", "stages")


def imported_modules(path: Path) -> set[Path]:
    """Project files (llm/*.py, llm/guide/*.py, stages/*.py) that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from llm import x` may import the module llm/x.py; `from llm.x import y` imports llm/x.py.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] not in PACKAGES or len(parts) < 2:
                continue
            for candidate in (Path(*parts[:-1], f"{parts[-1]}.py"), Path(*parts, "__init__.py")):
                if (ROOT / candidate).is_file():
                    found.add(candidate)
    return found


def import_closure(start: Path) -> set[Path]:
    """`start` (relative to the repository) and every project module it imports, directly or not."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(imported_modules(ROOT / module))
    return seen


def stage_command_module(cmd: str) -> Path:
    """`python -m stages tokenize` runs stages/tokenize.py."""
    match = re.search(r"-m stages ([a-z-]+)", cmd)
    assert match, f"not a stages command: {cmd}"
    return Path("stages", f"{match.group(1).replace('-', '_')}.py")


def code_dep_drift(pipeline: dict) -> dict[str, tuple[set[str], set[str]]]:
    """{stage: (modules it imports that its deps omit, listed .py deps it does not import)} for every stage
    whose code deps differ from its import closure."""
    drift = {}
    for name, stage in pipeline["stages"].items():
        listed = {dep for dep in stage.get("deps", []) if dep.endswith(".py")}
        needed = {str(path) for path in import_closure(stage_command_module(stage["cmd"]))}
        if listed != needed:
            drift[name] = (needed - listed, listed - needed)
    return drift


def test_every_stage_lists_exactly_the_code_it_runs():
    drift = code_dep_drift(yaml.safe_load((ROOT / "dvc.yaml").read_text()))
    report = [f"{stage}: missing {sorted(missing)}, not imported {sorted(extra)}"
              for stage, (missing, extra) in drift.items()]
    assert drift == {}, "dvc.yaml deps differ from the imports: " + "; ".join(report)


def test_a_removed_dep_is_reported():
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    broken = copy.deepcopy(pipeline)
    broken["stages"]["train"]["deps"].remove("llm/shards.py")
    broken["stages"]["evaluate"]["deps"].append("llm/fetch.py")
    drift = code_dep_drift(broken)
    assert drift["train"] == ({"llm/shards.py"}, set())
    assert drift["evaluate"] == (set(), {"llm/fetch.py"})


def test_the_closure_follows_imports_through_the_library():
    closure = import_closure(Path("stages/evaluate.py"))
    # evaluate -> llm.evaluate -> llm.report -> llm.checkpoint -> llm.distributed: two hops below the stage.
    assert {Path("llm/evaluate.py"), Path("llm/report.py"), Path("llm/checkpoint.py"),
            Path("llm/distributed.py"), Path("stages/cli.py")} <= closure
    assert Path("llm/fetch.py") not in closure


# Options whose default path is deliberately no dep or out of their stage in dvc.yaml.
NOT_IN_PIPELINE = {
    ("fetch", "downloads"): "a download cache: DVC would delete an out before rerunning fetch",
    ("fetch-sft", "downloads"): "the same download cache",
}


def default_paths(command: str) -> dict[str, Path]:
    """{option name: default path} of a stage command's path options (params.yaml aside)."""
    import typer.main

    from stages.__main__ import app

    group = typer.main.get_command(app)
    return {param.name: Path(param.default) for param in group.commands[command].params
            if isinstance(param.default, Path) and param.name != "params"}


def pipeline_paths(stage: dict) -> set[Path]:
    """The data paths a dvc.yaml stage names: its deps other than code, and its outs, metrics and plots."""
    named = [dep for dep in stage.get("deps", []) if not dep.endswith(".py")]
    for kind in ("outs", "metrics", "plots"):
        named += [next(iter(entry)) if isinstance(entry, dict) else entry for entry in stage.get(kind, [])]
    return {Path(path) for path in named}


def test_the_stage_options_default_to_the_paths_dvc_yaml_names():
    """The paths are written in the commands' options and in dvc.yaml: each path dvc.yaml names is an option's
    default (or inside a folder one names), and each option's default is in dvc.yaml, so they cannot drift."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for name, stage in pipeline["stages"].items():
        command = stage_command_module(stage["cmd"]).stem.replace("_", "-")
        options = {option: path for option, path in default_paths(command).items()
                   if (name, option) not in NOT_IN_PIPELINE}
        named = pipeline_paths(stage)
        for path in named:
            assert any(path == default or default in path.parents for default in options.values()), (
                f"dvc.yaml stage {name} names {path}, which no option of `{command}` defaults to")
        for option, default in options.items():
            assert any(default == path or default in path.parents for path in named), (
                f"`{command} --{option}` defaults to {default}, which dvc.yaml's stage {name} does not name")


def config_modules(stage: dict) -> set[str]:
    """The section config modules (llm/configs/*.py) a stage lists as deps."""
    return {dep for dep in stage.get("deps", []) if dep.startswith("llm/configs/")}


def test_a_stage_depends_on_the_configs_of_the_sections_it_reads_not_on_every_section():
    """Editing one section's config module reruns the stages that read it, not the whole pipeline."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert config_modules(stages["fetch"]) == {"llm/configs/data.py"}
    later = {"llm/configs/model.py", "llm/configs/train.py", "llm/configs/evaluate.py", "llm/configs/mlflow.py"}
    for name in ("fetch", "clean", "tokenizer", "tokenize"):
        assert not config_modules(stages[name]) & later, f"{name} lists a config of a stage after it"
    assert "llm/configs/train.py" in config_modules(stages["train"])
    # The reader of params.yaml imports no section's config: each stage brings only its own.
    assert not {str(path) for path in import_closure(Path("stages/params.py"))} & {
        f"llm/configs/{path.name}" for path in (ROOT / "llm" / "configs").glob("*.py")}
