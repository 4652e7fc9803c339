"""The fetch manifest (data/manifest.json): what fetch brought into data/raw/, file by file (name, size, sha256;
for a URL source also the URL, the store's etag and revision), whatever the source: builtin, local or a URL. A
rerun of a URL source checks every download against the sha256 the manifest holds. This module is the file's one
writer and reader."""

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from llm.errors import InputError, first_line
from llm.fileio import write_json_atomic

MANIFEST_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ManifestFile:
    name: str  # path under data/raw/
    size: int  # bytes
    sha256: str  # of the bytes brought, computed here (after download, for a URL)
    url: str | None = None  # where a remote file came from (hf://: at the pinned commit)
    etag: str | None = None  # the store's checksum or version tag: HF LFS sha256 or git blob id, S3/GCS/HTTP ETag
    revision: str | None = None  # hf://: the commit sha the source's revision resolved to


@dataclasses.dataclass(frozen=True)
class Manifest:
    source: str  # data.source as params.yaml gives it
    files: tuple[ManifestFile, ...]  # sorted by name

    def by_url(self) -> dict[str, ManifestFile]:
        return {file.url: file for file in self.files if file.url is not None}


FIELDS = {field.name: field for field in dataclasses.fields(ManifestFile)}
REQUIRED = {name for name, field in FIELDS.items() if field.default is dataclasses.MISSING}
KEYS = ("version", "source", "files")  # of the document itself
SHA256 = re.compile(r"[0-9a-f]{64}")


def write_manifest(path: str | Path, manifest: Manifest) -> None:
    """JSON, unset fields left out: a rerun that brings the same bytes writes the same file, byte for byte."""
    files = [{k: v for k, v in dataclasses.asdict(file).items() if v is not None} for file in manifest.files]
    write_json_atomic(path, {"version": MANIFEST_VERSION, "source": manifest.source, "files": files})


def parse_file(entry: Any, where: str = "a file entry") -> ManifestFile:
    """One entry of the manifest's files list; a ValueError names the bad field, `where` being the entry's place
    (`files[3]`)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is {type(entry).__name__}, not an object")
    if unknown := set(entry) - set(FIELDS):
        raise ValueError(f"{where} has unknown keys {shown(sorted(unknown))}")
    if missing := REQUIRED - set(entry):
        raise ValueError(f"{where} lacks {sorted(missing)}")
    for key, value in entry.items():
        wanted = int if key == "size" else str
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise ValueError(f"{where}.{key} is {shown(value)}, not a {wanted.__name__}")
    if entry["size"] < 0:
        raise ValueError(f"{where}.size is {entry['size']}, not a size in bytes")
    if not SHA256.fullmatch(entry["sha256"]):  # fetch pins the next download to it: it must be one
        raise ValueError(f"{where}.sha256 is {shown(entry['sha256'])}, not 64 lower-case hex digits")
    if not entry["name"]:
        raise ValueError(f"{where}.name is empty")
    return ManifestFile(**entry)


def shown(value: Any) -> str:
    """`value` for an error line: short, whatever a damaged file holds."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_manifest(document: Any) -> Manifest:
    """The manifest a parsed JSON document holds; a ValueError names the bad field."""
    if not isinstance(document, dict):
        raise ValueError(f"the document is {type(document).__name__}, not an object")
    if unknown := set(document) - set(KEYS):
        raise ValueError(f"unknown keys {shown(sorted(unknown))}")
    version, source, files = (document.get(key) for key in KEYS)
    if type(version) is not int or version != MANIFEST_VERSION:  # neither 1.0 nor true
        raise ValueError(f"version is {shown(version)}, not {MANIFEST_VERSION}")
    if not isinstance(source, str):
        raise ValueError(f"source is {type(source).__name__}, not a string")
    if not isinstance(files, list):
        raise ValueError(f"files is {type(files).__name__}, not a list")
    return Manifest(source, tuple(parse_file(entry, f"files[{i}]") for i, entry in enumerate(files)))


def read_manifest(path: str | Path) -> Manifest | None:
    """The manifest at `path`, or None when there is none; a file that is not one is an InputError that names
    the file and the field."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    # ValueError: not UTF-8, not JSON, or an integer of more digits than Python parses; RecursionError: nesting
    # deeper than the parser goes
    except (OSError, ValueError, RecursionError) as err:
        raise InputError(f"{path}: cannot read the fetch manifest ({first_line(err)}); delete it to fetch afresh") \
            from None
    try:
        return parse_manifest(document)
    except ValueError as err:
        raise InputError(f"{path}: not a fetch manifest ({err}); delete it to fetch afresh") from None
