import logging
from pathlib import Path

import typer

from stages.cli import stage

log = logging.getLogger(__name__)


@stage
def export_hf(
    params: Path = typer.Option(Path("params.yaml"), "--params", help="accepted like every command's; the "
                                "export reads only the model folder", dir_okay=False),
    model_dir: Path = typer.Option(Path("models/final"), "--model", help="trained model folder"),
    out: Path = typer.Option(..., help="the Hugging Face model folder to write: new, empty, or an "
                          "earlier export (replaced whole); anything else is refused"),
) -> None:
    """Write a folder that transformers loads offline: AutoModelForCausalLM (GPT2LMHeadModel or
    LlamaForCausalLM) and AutoTokenizer (PreTrainedTokenizerFast)."""
    from llm.export import export_hf as export_model
    from llm.model_io import load_model_dir

    model, _ = load_model_dir(model_dir)
    export_model(model, model_dir / "tokenizer.json", out, model_dir)
    log.info("wrote %s (%s, %.1f M parameters)", out, model.config.arch, model.num_params() / 1e6)
