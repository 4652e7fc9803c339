"""params.yaml -> typed, validated configs. The only place that reads params.yaml."""

import dataclasses
from pathlib import Path

import yaml

from llm.config import (
    CleanConfig,
    DataConfig,
    EvaluateConfig,
    MlflowConfig,
    ModelConfig,
    TokenizeConfig,
    TokenizerConfig,
    TrainConfig,
    from_mapping,
)
from llm.errors import ConfigError, InputError


@dataclasses.dataclass(frozen=True)
class Params:
    data: DataConfig
    clean: CleanConfig
    tokenizer: TokenizerConfig
    tokenize: TokenizeConfig
    model: ModelConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    mlflow: MlflowConfig

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {field.name: field.type for field in dataclasses.fields(Params)}


def load_params(path: Path) -> Params:
    """Read and validate the whole file before any work: unknown or missing keys and bad values fail."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: params file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read params file ({err})") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must be a mapping of sections ({', '.join(SECTIONS)})")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(str(section), f"unknown section in {path} (known: {', '.join(SECTIONS)})")
    for section in SECTIONS:
        if section not in raw:
            raise ConfigError(section, f"missing section in {path}")
    return Params(**{name: from_mapping(cls, raw[name], name) for name, cls in SECTIONS.items()})
