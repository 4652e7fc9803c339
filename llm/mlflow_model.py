"""The base model as an MLflow pyfunc, logged "from code" (llm/model_registry.py): MLflow stores this file beside
the model's artifacts (our model folder: model.safetensors, config.json, tokenizer.json) and, to load the model, runs
it and takes the object it hands to `mlflow.models.set_model`. Nothing is pickled: the weights are read with our
safetensors loader, as `python -m stages generate` reads them; the code is this file and the `llm` package.

In: a table with a `prompt` column; out: the generated text of each; the params are generate's sampling flags, with
the defaults of the model's signature. llm/mlflow_chat_model.py is the instruction-tuned model's counterpart.
"""

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class TextModel(PythonModel):
    """Continues each prompt as `python -m stages generate --prompt P` does with the same flags: the same seed gives
    the same text."""

    # The input schema is the logged signature, not type hints on predict: MLflow skips its type-hint wrapper (and its
    # warning, at every log and load, that predict has none), as it does for its own ChatModel.
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from llm.config import EOT
        from llm.model_registry import load_artifacts

        self.model, self.tokenizer, _ = load_artifacts(context.artifacts)
        self.eot_id = self.tokenizer.token_to_id(EOT)

    # No type hints on context and model_input: MLflow would try to read an input schema from them.
    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        from llm.configs.evaluate import check_sampling
        from llm.generate import generate, prompt_ids

        params = params or {}  # MLflow fills in what a request leaves out from the signature's defaults
        sampling = {"temperature": float(params["temperature"]), "top_k": int(params["top_k"]),
                    "top_p": float(params["top_p"])}
        check_sampling(**sampling)
        seed = None if params.get("seed") is None else int(params["seed"])
        texts = []
        for prompt in model_input["prompt"]:
            ids = generate(self.model, prompt_ids(self.tokenizer, str(prompt), self.eot_id),
                           int(params["max_new_tokens"]), seed=seed, eot_id=self.eot_id, **sampling)
            texts.append(self.tokenizer.decode(list(ids), skip_special_tokens=True))
        return texts


mlflow.models.set_model(TextModel())  # what MLflow takes when it logs or loads the model
