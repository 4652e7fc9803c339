import logging
from pathlib import Path

import typer

from llm.export import export_hf as export_model
from llm.model_io import load_model_dir
from stages.cli import stage

log = logging.getLogger(__name__)


@stage
def export_hf(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="accepted like every command's; the "
                                "export reads only the model folder", dir_okay=False),
    model: Path = typer.Option(Path("models/final"), help="trained model folder"),
    out: Path = typer.Option(..., help="the Hugging Face model folder to write (replaced whole)"),
) -> None:
    """Write a folder that transformers loads offline: AutoModelForCausalLM (GPT2LMHeadModel or
    LlamaForCausalLM) and AutoTokenizer (PreTrainedTokenizerFast)."""
    net, _ = load_model_dir(model)
    export_model(net, model / "tokenizer.json", out)
    log.info("wrote %s (%s, %.1f M parameters)", out, net.config.arch, net.num_params() / 1e6)
