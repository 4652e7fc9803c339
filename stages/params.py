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

from llm.config import from_mapping, shown
from llm.errors import ConfigError, InputError, first_line

SECTIONS = ("data", "clean", "tokenizer", "tokenize", "model", "train", "evaluate", "sft", "mlflow")
# The default file is 5 KB and ~200 YAML nodes. Past these it is not a params file but a hostile one: an alias
# "billion laughs" of 2 KB expands to 10**9 values, and a long file takes PyYAML's pure-Python parser minutes.
MAX_PARAMS_BYTES = 1 << 20
MAX_NODES = 100_000  # values and keys after alias expansion


class _Refused(Exception):
    """A params file refused while composing it: line (from 1, or None) and why."""

    def __init__(self, line: int | None, problem: str) -> None:
        super().__init__(problem)
        self.line = line


class _ParamsLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing duplicate keys (YAML leaves them to the loader; PyYAML keeps the last, so a
    second `lr:` in a section would silently win) and documents whose aliases expand past MAX_NODES."""

    def compose_document(self) -> yaml.Node:
        document = super().compose_document()
        sizes = _expanded_sizes(document)
        if sizes[id(document)] > MAX_NODES:
            (key, line) = _heaviest_key(document, sizes)
            raise _Refused(line, f"{key}: aliases expand it to more than {MAX_NODES} values (a YAML alias bomb?)")
        return document

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = self.construct_object(key_node)
                if key in seen:
                    raise _Refused(key_node.start_mark.line + 1, f"duplicate key {shown(key)}")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return node.value if isinstance(node, yaml.SequenceNode) else []


def _expanded_sizes(root: yaml.Node) -> dict[int, int]:
    """How many nodes each node of the document holds once every alias is expanded (a shared node counts each
    time it is used; capped past MAX_NODES), by id, without expanding any: each distinct node is sized once.
    A node that contains itself is refused."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:  # iterative: a deeply nested document would exhaust Python's recursion limit
        node, children_done = stack.pop()
        children = _children(node)
        if children_done:
            on_path.discard(id(node))
            sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children), MAX_NODES + 1)
            continue
        if id(node) in sizes:
            continue
        if id(node) in on_path:
            raise _Refused(node.start_mark.line + 1, "an alias refers to a node that contains it")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes


def _heaviest_key(root: yaml.Node, sizes: dict[int, int]) -> tuple[str, int]:
    """The dotted key (section.key) under which the document is largest, where an alias bomb sits, and its line."""
    keys, node = [], root
    while isinstance(node, yaml.MappingNode) and node.value and len(keys) < 2:
        (key, node) = max(node.value, key=lambda pair: sizes[id(pair[1])])
        keys.append(shown(key.value, quote=False) if isinstance(key, yaml.ScalarNode) else "?")
    return (".".join(keys) or "the document", node.start_mark.line + 1)


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
        with path.open("rb") as file:
            data = file.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: params file not found") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read params file ({first_line(err)})") from None
    if len(data) > MAX_PARAMS_BYTES:
        raise InputError(f"{path}: larger than {MAX_PARAMS_BYTES >> 20} MiB: not a params file")
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except _Refused as err:
        raise InputError(f"{path}{f', line {err.line}' if err.line else ''}: {err}") from None
    except yaml.YAMLError as err:
        raise InputError(f"{path}: invalid YAML ({shown(' '.join(str(err).split()), 300, quote=False)})") from None
    except RecursionError:
        raise InputError(f"{path}: nested too deeply") from None
    except ValueError as err:  # a value YAML reads but Python will not build: an integer of 5,000 digits
        raise InputError(f"{path}: invalid value ({shown(first_line(err), 300, quote=False)})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: must be a mapping of sections ({', '.join(SECTIONS)})")
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(shown(section, quote=False), f"unknown section in {path} (known: {', '.join(SECTIONS)})")
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


def committed_params(text: str | None) -> dict[str, Any] | None:
    """A params file as committed (its text: llm.lineage.committed_text), as written, to compare a run's with; None
    when there is none or it does not read as one: it only names a run, and an odd old commit stops no training."""
    if text is None:
        return None
    try:
        raw = yaml.load(text, Loader=_ParamsLoader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, _Refused, RecursionError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None
