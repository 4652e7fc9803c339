import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llm.config import TokenizerConfig
from llm.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[1]

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
def _sample_tokenizer_json(vocab_size: int) -> str:
    cfg = TokenizerConfig(vocab_size=vocab_size, min_frequency=1)
    return train_tokenizer(SAMPLE_TEXTS * 3, cfg).to_str()


@pytest.fixture
def sample_tokenizer_path(tmp_path: Path) -> Path:
    path = tmp_path / "tokenizer.json"
    path.write_text(_sample_tokenizer_json(400))
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


def data_project(work: Path, **overrides: dict) -> Path:
    """`work` set up as a project whose data stages (fetch to tokenize) have run on a small corpus."""
    corpus = work / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text(f"Scene {i}. " + "But soft, what light through yonder window breaks? " * 40)
    write_params(work / "params.yaml", data={"source": str(corpus), "val_fraction": 0.25},
                 tokenizer={"vocab_size": 300, "min_frequency": 1}, clean={"min_chars": 10}, **overrides)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command in ("fetch", "clean", "tokenizer", "tokenize"):
        subprocess.run([sys.executable, "-m", "stages", command], cwd=work, env=env, check=True, capture_output=True)
    return work


def make_model_dir(out: Path, tokenizer_path: Path, arch: str = "gpt2", block_size: int = 32, seed: int = 0) -> Path:
    """A models/final-style folder holding a tiny random model (weights spread wider than at init, so that
    greedy decoding does not just repeat one token) and the given tokenizer."""
    import torch

    from llm.checkpoint import tied_aliases
    from llm.model import GPT, GPTConfig
    from llm.model_io import save_model_dir
    from llm.tokenizer import load_tokenizer

    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    cfg = GPTConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=block_size, dropout=0.0,
                    vocab_size=vocab_size)
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
