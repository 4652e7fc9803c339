import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from llm.configs.tokenizer import TokenizerConfig
from llm.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

# One compute thread per test process: `make test` runs two test processes side by side (pytest-xdist), and
# the stage subprocesses they start inherit the setting. Tiny models gain nothing from more.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# The peak FLOP/s for MFU, given instead of measured (a second per training): tests check MFU's arithmetic,
# not this machine's speed. tests/test_train_stage.py measures it once.
os.environ["LLM_PEAK_FLOPS"] = "1e11"

# A small multilingual corpus: enough merges to make BPE non-trivial, seconds to train.
SAMPLE_TEXTS = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;\n"
    "And all the clouds that lour'd upon our house\nIn the deep bosom of the ocean buried.\n",
    "Le cœur a ses raisons que la raison ne connaît point. Ça va très bien, merci.\n",
    "Ein Mann, der recht zu wirken denkt, muss auf das beste Werkzeug halten. Größe und Übermut.\n",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。 東京は日本の首都です。\n",
    "في البدء كانت الكلمة، والكلمة كانت عند الله.\n",
    "सत्यमेव जयते। वसुधैव कुटुम्बकम्।\n",
    "def main():\n    for i in range(10):\n        print(i  *  2)\t# tabs\tand  spaces\n",
    "Emoji 🎭🎭 and flags 🇬🇧, zero-width joiners 👩‍💻, combining e\u0301 and 1234567890.\n",
]


@functools.cache
def _sample_tokenizer_json(vocab_size: int, chat: bool = False) -> str:
    """The tokenizer trained on SAMPLE_TEXTS; with `chat`, the chat tokens (llm/chat.py) after <|endoftext|>."""
    from llm.chat import CHAT_TOKENS
    from llm.config import EOT

    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=1, special_tokens=(EOT, *(CHAT_TOKENS if chat else ())))
    return train_tokenizer(SAMPLE_TEXTS * 3, cfg).to_str()


@pytest.fixture
def sample_tokenizer_path(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(_sample_tokenizer_json(400))
    return path


@pytest.fixture
def chat_tokenizer_path(tmp_path: Path) -> Path:
    """The sample tokenizer with the chat tokens among its special tokens."""
    path = tmp_path / "chat_tokenizer.json"
    path.write_text(_sample_tokenizer_json(400, chat=True))
    return path


def write_params(path: Path, **overrides: dict) -> Path:
    """params.yaml from the repo's defaults with per-section overrides."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(params))
    return path


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def stage_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a stage run by a test: this checkout importable, the system's tools, nothing
    from the caller's environment but the compute settings above, then `env`."""
    return {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
            "LLM_PEAK_FLOPS": os.environ["LLM_PEAK_FLOPS"], **(env or {})}


def run_stage_process(cwd: Path, *args: object, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m stages ARGS` in `cwd` in a new process, as a user runs it: for what only a process shows
    (the entry point, a fresh interpreter). Each costs the seconds a new interpreter takes to import torch."""
    return subprocess.run([sys.executable, "-m", "stages", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=stage_env(env))


def run_stage(cwd: Path, *args: object, env: dict[str, str] | None = None,
              stdin: str | None = None) -> subprocess.CompletedProcess:
    """`python -m stages ARGS` run in this process, with what run_stage_process would give: the exit code,
    stdout, stderr (a traceback there for an uncaught exception, warnings shown as Python shows them by
    default), in `cwd` and the same bare environment. The process-wide state a command changes is put back
    after it: the environment, working directory, root logger, SIGINT/SIGTERM handlers, torch's thread
    count, and MLflow's tracking URI and active run (ended, as MLflow's exit hook would end it). `stdin` is
    what the command reads on its standard input."""
    from typer.testing import CliRunner

    import stages.__main__  # noqa: F401  (registers every command)
    from stages.cli import app

    argv, environment = [str(arg) for arg in args], stage_env(env)
    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    saved_signals = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    os.environ.clear()
    os.environ.update(environment)
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():
            interpreter_warnings()
            result = CliRunner().invoke(app, argv, prog_name="python -m stages", input=stdin)
    finally:
        end_mlflow_state()
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for signum, handler in saved_signals.items():
            if handler is not None:  # None: a handler set outside Python, which Python cannot set back
                signal.signal(signum, handler)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        torch.set_num_threads(threads)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # as the interpreter prints it, exit 1
    return subprocess.CompletedProcess(["python", "-m", "stages", *argv], result.exit_code, result.stdout, stderr)


def interpreter_warnings() -> None:
    """Within catch_warnings: Python's default warning filters (not pytest's), each warning written to the
    current sys.stderr, so that a stage's warnings reach its stderr as they would in its own process."""
    warnings.resetwarnings()
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.simplefilter("ignore", category)

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    warnings.showwarning = show


def end_mlflow_state() -> None:
    """What a stage process leaves of MLflow dies with it; in this process, end a run still active (MLflow's
    exit hook ends it as FINISHED) and forget the tracking URI, as a new process starts without them."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    if mlflow.active_run() is not None:
        with contextlib.suppress(Exception):  # as the exit hook does: a server gone is no error of the stage
            mlflow.end_run()
    mlflow.set_tracking_uri(None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only_mlflow_run(tracking_uri: str, experiment: str):
    """(client, run): the one run of `experiment` (fails unless there is exactly one)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    [found] = [e for e in client.search_experiments() if e.name == experiment]
    [run] = client.search_runs([found.experiment_id])
    return client, run


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow SQLite database with its tables made: a copy spares a test's training the 2-3 s that MLflow's
    migrations take on a new database."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


# The tiny model and training the stage tests run: seconds per training on a CPU.
TINY_MODEL = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "dropout": 0.0}
TINY_TRAIN = {"batch_size": 4, "grad_accum_steps": 1, "max_steps": 12, "warmup_steps": 2, "eval_interval": 6,
              "eval_batches": 2, "log_interval": 3, "checkpoint_interval": 6, "dtype": "float32"}
DATA_PARAMS = {"data": {"val_fraction": 0.25}, "tokenizer": {"vocab_size": 300, "min_frequency": 1},
               "clean": {"min_chars": 10}}


@pytest.fixture(scope="session")
def data_stages_output(tmp_path_factory) -> Path:
    """A project whose data stages (fetch to tokenize) ran once on a small corpus; copied by data_project."""
    work = tmp_path_factory.mktemp("data-stages")
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"Scene {i}. " + "But soft, what light through yonder window breaks? " * 40)
    write_params(work / "params.yaml", **{**DATA_PARAMS, "data": {**DATA_PARAMS["data"], "source": str(corpus)}})
    for command in ("fetch", "clean", "tokenizer", "tokenize"):
        result = run_stage(work, command)
        assert result.returncode == 0, result.stderr
    return work


@pytest.fixture(scope="session")
def data_project(data_stages_output: Path, empty_mlflow_db: Path):
    """make(work, **params overrides): `work` set up as a project whose data stages have run (a copy of
    data_stages_output) with an empty mlflow.db; the overrides are for the later stages (model, train,
    evaluate, mlflow)."""

    def make(work: Path, **overrides: dict) -> Path:
        shutil.copytree(data_stages_output, work, dirs_exist_ok=True)
        shutil.copy(empty_mlflow_db, work / "mlflow.db")
        source = {"source": str(data_stages_output / "corpus")}
        write_params(work / "params.yaml", **{**DATA_PARAMS, "data": {**DATA_PARAMS["data"], **source}}, **overrides)
        return work

    return make


def make_model_dir(out: Path, tokenizer_path: Path, arch: str = "gpt2", block_size: int = 32, seed: int = 0,
                   **parts) -> Path:
    """A models/final-style folder holding a tiny random model (weights spread wider than at init, so that
    greedy decoding does not just repeat one token) and the given tokenizer; `parts` override the preset's."""
    import torch

    from llm.model import GPT, GPTConfig, tied_aliases
    from llm.model_io import save_model_dir
    from llm.tokenizer import load_tokenizer

    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    cfg = GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=block_size, dropout=0.0,
                    vocab_size=vocab_size, **parts)
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    aliases = tied_aliases(model)
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k not in aliases}
    save_model_dir(out, cfg, weights, tokenizer_path)
    return out


@pytest.fixture
def tiny_model_dir(tmp_path: Path, sample_tokenizer_path: Path) -> Path:
    return make_model_dir(tmp_path / "model", sample_tokenizer_path)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow end-to-end files first (a stable sort keeps the order within each group): with one test
    process per core, the longest files start at once and the short ones fill in around them."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# The tuning of tests/test_sft.py's stage test: seconds on invented plays.
TINY_SFT = {"train_conversations": 60, "questions_per_task": 3, "shots": 1, "max_steps": 4, "batch_size": 2,
            "warmup_steps": 1, "eval_interval": 2, "eval_batches": 1, "log_interval": 2, "checkpoint_interval": 2,
            "dtype": "float32"}


@pytest.fixture(scope="session")
def guide_project(tmp_path_factory, data_project) -> Path:
    """A tiny project trained (12 steps, an evaluation every 6), evaluated, instruction-tuned (4 steps, on
    conversations about invented plays, tracked in an experiment of its own) and its guide built. The context is
    256 tokens, so that the conversations fit."""
    work = tmp_path_factory.mktemp("guide")
    data_project(work, mlflow={"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "guide"},
                 model={**TINY_MODEL, "block_size": 256}, train=TINY_TRAIN, sft=TINY_SFT)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "sft_params.yaml").write_text(yaml.safe_dump({**params, "mlflow": {**params["mlflow"],
                                                                               "experiment": "guide-sft"}}))
    from tests.test_sft import write_plays  # imported here: tests/test_sft.py imports this module

    plays = write_plays(work / "plays")
    for command in (("train",), ("evaluate",), ("sft", "--params", "sft_params.yaml", "--clean", plays),
                    ("guide", "--clean", plays)):
        start = time.monotonic()
        result = run_stage(work, *command, env={"HOME": str(work)})
        assert result.returncode == 0, result.stderr[-3000:]
        print(f"{command[0]}: {time.monotonic() - start:.1f} s")
    return work


def caught_attention(model, ids: list[int], monkeypatch) -> list[tuple[torch.Tensor, ...]]:
    """(q, k, v, out) of each layer, as the model's forward pass hands them to scaled_dot_product_attention."""
    caught = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def catching(q, k, v, **kwargs):
        out = sdpa(q, k, v, **kwargs)
        caught.append((q, k, v, out))
        return out

    import llm.model

    monkeypatch.setattr(llm.model.F, "scaled_dot_product_attention", catching)
    with torch.no_grad():
        model(torch.tensor([ids]))
    monkeypatch.undo()
    return caught


@pytest.fixture(scope="session")
def served_guide(guide_project: Path):
    """guide_project's reports/guide/ over HTTP on loopback, as a browser reads a site: its base URL."""
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    handler = functools.partial(Quiet, directory=str(guide_project / "reports/guide"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
