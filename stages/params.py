"""params.yaml -> typed, validated configs. The only place that reads params.yaml.

A stage names the sections it reads and their config classes, `load_params(path, data=DataConfig)`, and only those
are validated: so a stage imports, and dvc.yaml lists, only its own sections' config modules (llm/configs/), and
editing one section's config does not rerun every stage. The file as a whole is checked every time (a mapping of
exactly SECTIONS); `python -m stages check-params` validates every section at once.
"""

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from llm.config import from_mapping
from llm.errors import ConfigError, InputError

SECTIONS = ("data", "clean", "tokenizer", "tokenize", "model", "train", "evaluate", "mlflow")


@dataclasses.dataclass(frozen=True)
class Params:
    """The sections a stage loaded, validated, as attributes (`params.train`), and the whole file as written."""

    configs: dict[str, Any]
    raw: dict[str, Any]

    def __getattr__(self, section: str) -> Any:
        configs = self.__dict__.get("configs", {})
        if section not in configs:
            raise AttributeError(f"params section {section!r} was not loaded: load_params(path, {section}=...)")
        return configs[section]

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every param of the file, as a run records them: the loaded sections as validated (a model's parts
        resolved from its preset), the others as written."""
        return {section: dataclasses.asdict(self.configs[section]) if section in self.configs else self.raw[section]
                for section in SECTIONS}


def read_params(path: Path) -> dict[str, Any]:
    """The params file as written, checked to be a mapping of exactly SECTIONS; its values are not validated."""
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
    return raw


def load_params(path: Path, **sections: type) -> Params:
    """Read the params file and validate the sections named, each into its config class (`train=TrainConfig`),
    before any work: unknown or missing sections and keys, and bad values, fail with the dotted key."""
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"not params sections: {', '.join(sorted(unknown))}")
    raw = read_params(path)
    return Params({section: from_mapping(sections[section], raw[section], section)
                   for section in SECTIONS if section in sections}, raw)
