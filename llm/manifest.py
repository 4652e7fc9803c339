"""The fetch manifest (data/manifest.json): what fetch brought into data/raw/, file by file (name, size, sha256;
for a URL source also the URL, the store's etag and revision), whatever the source: builtin, local or a URL. A
rerun of a URL source checks every download against the sha256 the manifest holds. This module is the file's one
writer and reader."""

import dataclasses
import json
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
        raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
    if missing := REQUIRED - set(entry):
        raise ValueError(f"{where} lacks {sorted(missing)}")
    for key, value in entry.items():
        wanted = int if key == "size" else str
        if not isinstance(value, wanted) or isinstance(value, bool):
            raise ValueError(f"{where}.{key} is {value!r}, not a {wanted.__name__}")
    return ManifestFile(**entry)


def parse_manifest(document: Any) -> Manifest:
    """The manifest a parsed JSON document holds; a ValueError names the bad field."""
    if not isinstance(document, dict):
        raise ValueError(f"the document is {type(document).__name__}, not an object")
    if unknown := set(document) - set(KEYS):
        raise ValueError(f"unknown keys {sorted(unknown)}")
    version, source, files = (document.get(key) for key in KEYS)
    if version != MANIFEST_VERSION:
        raise ValueError(f"version is {version!r}, not {MANIFEST_VERSION}")
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read the fetch manifest ({first_line(err)}); delete it to fetch afresh") \
            from None
    try:
        return parse_manifest(document)
    except ValueError as err:
        raise InputError(f"{path}: not a fetch manifest ({err}); delete it to fetch afresh") from None
