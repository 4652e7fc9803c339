"""reports/: what a trained model writes (samples.md) and how its attention formed (heatmaps PNG). Each file is
replaced on its own (reports/guide/ belongs to the guide stage). This module is samples.md's one writer and reader
(`Sample`, `read_samples`)."""

import dataclasses
import html
import logging
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from llm.attention import probe_ids
from llm.checkpoint import checkpoint_dirs, checkpoint_step
from llm.configs.evaluate import EvaluateConfig
from llm.errors import InputError
from llm.fileio import atomic_dir, write_bytes_atomic
from llm.generate import generate, prompt_ids
from llm.model import GPT
from llm.model_io import load_weights
from llm.plots import plot_attention, plot_attention_evolution, plot_loss
from llm.tokenizer import token_label

log = logging.getLogger(__name__)

def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of the index-th prompt (0-based): each prompt draws its own random stream, so that
    the samples of similar prompts do not converge onto one passage."""
    return seed + index


def sample_text(model: GPT, tokenizer: Tokenizer, prompt: str, cfg: EvaluateConfig, eot_id: int, seed: int) -> str:
    ids = list(generate(model, prompt_ids(tokenizer, prompt, eot_id), cfg.max_new_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=seed, eot_id=eot_id))
    return tokenizer.decode([i for i in ids if i != eot_id])


@dataclasses.dataclass(frozen=True)
class Sample:
    """One section of samples.md: a prompt and what the model wrote after it, sampled with `seed`."""

    number: int  # 1-based: the prompt's place in evaluate.prompts
    seed: int
    prompt: str
    continuation: str

    @property
    def title(self) -> str:
        """The section's heading: its number and the prompt's first line that is not blank."""
        first_line = next((line for line in self.prompt.splitlines() if line.strip()), "(empty prompt)")
        return f"Sample {self.number}: {first_line}"

    def markdown(self) -> list[str]:
        """The section's lines: the title as a heading, then the prompt in bold and the continuation inside
        <pre>, every piece of text escaped (the prompts come from params, the continuation from the model)."""
        body = f"<b>{html.escape(self.prompt, quote=False)}</b>{html.escape(self.continuation, quote=False)}"
        return [f"## {markdown_text(self.title)}", "", f"seed {self.seed}", "", "<pre>", body, "</pre>", ""]


# What Markdown (CommonMark, and GitHub's: strikethrough, tables, math) may read as markup inside a line; a
# backslash makes each a plain character. <, > and & become HTML entities instead, text to every renderer. The
# rest of ASCII's punctuation does nothing without one of these, or only at the start of a line.
_MARKUP = re.compile(r"([\\`*_\[\]#~|$])")


def markdown_text(text: str) -> str:
    """`text` as Markdown inside a line (a heading's) that renders as that text: no tag, link, image, emphasis,
    code or math (a heading's renderer still trims whitespace at its ends)."""
    return _MARKUP.sub(r"\\\1", html.escape(text, quote=False))


# A section as Sample.markdown writes it. The text inside <pre> is escaped, so its first "</b>" and its "\n</pre>"
# are the writer's own.
_SECTION = re.compile(r"## Sample (\d+): [^\n]*\n\nseed (\d+)\n\n<pre>\n<b>(.*?)</b>(.*?)\n</pre>", flags=re.S)


def read_samples(markdown: str) -> list[Sample]:
    """The samples of a samples.md, in order."""
    return [Sample(int(number), int(seed), html.unescape(prompt), html.unescape(continuation))
            for number, seed, prompt, continuation in _SECTION.findall(markdown)]


def samples_markdown(model: GPT, tokenizer: Tokenizer, cfg: EvaluateConfig, eot_id: int) -> str:
    config = model.config
    lines = ["# Samples", "",
             f"{config.arch}, {config.n_layer} layers x {config.n_head} heads x {config.n_embd}, "
             f"context {config.block_size}; "
             f"temperature {cfg.temperature}, top-k {cfg.top_k}, top-p {cfg.top_p}, "
             f"up to {cfg.max_new_tokens} new tokens. The prompt is in bold.", ""]
    for i, prompt in enumerate(cfg.prompts):
        seed = prompt_seed(cfg.seed, i)
        lines += Sample(i + 1, seed, prompt, sample_text(model, tokenizer, prompt, cfg, eot_id, seed)).markdown()
    return "\n".join(lines)


def attention_snapshots(model: GPT, initial: GPT, checkpoints: Path) -> list[tuple[str, str, GPT]]:
    """(title, file stem, model) in training order: the initial weights, each saved checkpoint, the final
    model. Checkpoints that do not fit the model's config (another run's) are skipped with a warning."""
    snapshots = [("step 0 (init)", "step_000000", initial)]
    for path in reversed(checkpoint_dirs(checkpoints)):
        try:
            weights = load_weights(GPT(model.config), path / "model.safetensors")
        except InputError as err:
            log.warning("attention maps: skipping checkpoint %s (%s)", path, err)
            continue
        if all(torch.equal(a, b) for a, b in zip(weights.state_dict().values(), model.state_dict().values(),
                                                 strict=True)):
            continue  # the last checkpoint often is the final model
        step = checkpoint_step(path)
        snapshots.append((f"step {step}", f"step_{step:06d}", weights))
    snapshots.append(("final", "final", model))
    return snapshots


def write_reports(out: Path, model: GPT, initial: GPT, tokenizer: Tokenizer, cfg: EvaluateConfig, eot_id: int,
                  checkpoints: Path, train_csv: Path | None) -> list[Path]:
    """Write samples.md, loss.png (when the training's loss table exists) and the attention heatmaps into
    `out`, each file atomically (attention/ as a whole); return them (attention/ as one folder)."""
    written = [out / "samples.md"]
    write_bytes_atomic(written[0], samples_markdown(model, tokenizer, cfg, eot_id).encode())
    if train_csv is not None and Path(train_csv).is_file():
        plot_loss(train_csv, out / "loss.png")
        written.append(out / "loss.png")

    ids = probe_ids(tokenizer, cfg.attention_text, eot_id, model.config.block_size)
    labels = [token_label(tokenizer, i) for i in ids]
    evolution = []
    device = model.device
    with atomic_dir(out / "attention") as staging:
        for title, stem, snapshot in attention_snapshots(model, initial, checkpoints):
            maps = snapshot.to(device).eval().attention_maps(torch.tensor([ids], device=device)).cpu().numpy()
            plot_attention(maps, labels, f"attention, {title}: {cfg.attention_text!r}", staging / f"{stem}.png")
            evolution.append((title, maps))
    written.append(out / "attention")
    plot_attention_evolution(evolution, out / "attention_evolution.png")
    written.append(out / "attention_evolution.png")
    return written
