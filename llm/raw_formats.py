"""Which raw files the pipeline reads, by their name's suffix: the one table that fetch (which files to bring into
data/raw/) and llm/readers.py (how clean reads each) both follow, so the two cannot drift apart. It imports
nothing, so that fetch does not load the readers' Parquet and compression libraries."""

# Suffix (compared in lower case; ".jsonl.gz" counts as a whole) -> format. llm/readers.py has a reader per format.
SUFFIXES = {
    ".txt": "plain",
    ".md": "plain",
    ".jsonl": "jsonl",
    ".jsonl.gz": "jsonl",
    ".jsonl.zst": "jsonl",
    ".parquet": "parquet",
}


def raw_format(name: str) -> str | None:
    """The format of the file called `name`, by its suffix, or None when the pipeline does not read it."""
    lower = name.lower()
    return next((fmt for suffix, fmt in SUFFIXES.items() if lower.endswith(suffix)), None)
