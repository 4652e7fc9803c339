"""Every params file, whatever YAML (or not-YAML) it holds, gives exit 0 or exit 2 with one line, in bounded time.

The cases are random mutations of the default params.yaml, seeded: a leaf value replaced by a hostile one (a wrong
type, a huge number, a nested structure, an alias bomb, a very long string), keys added or repeated, bytes that are
not UTF-8, tabs, lines cut or dropped. Each runs through `check-params` (every section) and the `tokenizer` stage
(a real stage, on a tiny corpus: a valid file trains a tokenizer)."""

import random
import re
import signal
import time
from pathlib import Path

import pytest

from llm.clean import clean_corpus
from llm.config import EOT
from llm.configs.clean import CleanConfig
from tests.conftest import ROOT, SAMPLE_TEXTS, run_stage

DEFAULT = (ROOT / "params.yaml").read_text()
LEAF = re.compile(r"^(  )([A-Za-z_]+): ([^#\n]*?)(\s+#.*)?$", re.MULTILINE)  # a key of a section and its value


def alias_bomb(levels: int = 9) -> str:
    """The 'billion laughs': each level lists the previous one 9 times, 9**levels strings from ~600 bytes."""
    lists = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lists += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "[" + ", ".join(lists) + "]"


HOSTILE_VALUES = [  # YAML text of a value
    '"a string"', "42", "-1", "0", "3.5", "true", "null", "~", "[]", "{}", "[1, 2]", "{a: 1}", '""', "2020-01-01",
    "!!binary aGVsbG8=", "!!set {a, b}", "!!python/object/apply:os.system [echo]", "!!str", "!!int x", ".inf",
    "-.inf", ".nan", "0x7fffffffffffffff", "0o777", "1_000", "1e400", "-1e400", "1.0e-400", "2000000000",
    "4294967296", "9" * 400, "-" + "9" * 400, "1" + "0" * 5000, "[" * 60 + "]" * 60, "[" * 5000 + "]" * 5000,
    "{a: " * 40 + "1" + "}" * 40, '"' + "x" * 100_000 + '"', '"' + "\u00e9\U0001f3ad" * 5000 + '"', '"a\\nb"',
    '"\\0nul"', '"\\e[31mred"', '"<script>alert(1)</script>"', alias_bomb(), alias_bomb(5), "&r [*r]", "*undefined",
    "&a 5", "[&b x, *b, *b]", "{<<: {a: 1}}", '"' + "\\ud800" + '"', "'unterminated", "[1, 2", "{a", "- x",
    "|\n    block\n    text", "? complex\n  : key", "@reserved", "`backtick", "%directive",
]
HOSTILE_KEYS = ["ключ", "🎭", '"a\\nb"', '"' + "k" * 5000 + '"', "1", "null", "true", "? [1, 2]\n  ", "section",
                '"\\0"', "<<", "2020-01-01", "x y", "'quoted'"]


def mutate(text: str, rng: random.Random) -> bytes:
    """One hostile edit of a params file (or a whole hostile file)."""
    leaves = list(LEAF.finditer(text))
    leaf = rng.choice(leaves)
    lines = text.splitlines(keepends=True)
    kind = rng.choice(["value", "value", "value", "key", "duplicate", "section", "bytes", "tab", "cut", "drop",
                       "whole"])
    if kind == "value":
        return (text[:leaf.start(3)] + rng.choice(HOSTILE_VALUES) + text[leaf.end(3):]).encode()
    if kind == "key":
        return (text[:leaf.start()] + f"  {rng.choice(HOSTILE_KEYS)}: 1\n" + text[leaf.start():]).encode()
    if kind == "duplicate":
        return (text[:leaf.end()] + "\n" + leaf.group(0) + text[leaf.end():]).encode()
    if kind == "section":
        return (text + rng.choice(["data:\n  source: x\n", "extra:\n  a: 1\n", "model: 5\n", "train: [1]\n",
                                   "? [a]\n: 1\n", "1: x\n", "null: ~\n"])).encode()
    if kind == "bytes":
        at = rng.randrange(len(text))
        return text[:at].encode() + rng.choice([b"\xff\xfe", b"\xc0\xaf", b"\x00", b"\x07", b"\xed\xa0\x80",
                                                b"\x1b[2J", b"\xe2\x80\xa8"]) + text[at:].encode()
    if kind == "tab":
        index = rng.randrange(len(lines))
        lines[index] = "\t" + lines[index].lstrip(" ")
        return "".join(lines).encode()
    if kind == "cut":
        return text.encode()[:rng.randrange(len(text.encode()))]
    if kind == "drop":
        del lines[rng.randrange(len(lines))]
        return "".join(lines).encode()
    return rng.choice([b"", b"# only a comment\n", b"just a scalar\n", b"- a\n- list\n", b"---\na: 1\n---\nb: 2\n",
                       bytes(rng.randrange(256) for _ in range(2000)), b"\xef\xbb\xbf" + text.encode(),
                       text.replace("\n", "\r\n").encode(), text.replace("\n  ", "\n    ", 1).encode(),
                       text.encode() * 2, b"x: " + b"y" * (2 << 20)])


CASES = 160
STAGE_CASES = 50  # of them, also run through the tokenizer stage
SECONDS = 5.0  # per case: a params file is parsed and checked in milliseconds


class TookTooLong(Exception):
    pass


def run_bounded(cwd: Path, *args: object):
    """run_stage, stopped by an alarm past twice the time bound (an unbounded case then fails, it does not hang)."""

    def alarm(signum, frame):
        raise TookTooLong

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, 2 * SECONDS)
    start = time.monotonic()
    try:
        result = run_stage(cwd, *args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return result, time.monotonic() - start


def assert_one_line_or_success(result, elapsed: float, params: bytes) -> None:
    context = f"params: {params[:300]!r}...\nstderr: {result.stderr[-3000:]}"
    assert "TookTooLong" not in result.stderr and elapsed < SECONDS, f"took {elapsed:.1f} s\n{context}"
    assert result.returncode in (0, 2), context
    if result.returncode == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) < 500, context


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A folder with a tiny cleaned corpus (data/clean), where the tokenizer stage can run."""
    root = tmp_path_factory.mktemp("hostile")
    raw = root / "raw"
    raw.mkdir()
    for i, text in enumerate(SAMPLE_TEXTS * 4):
        (raw / f"{i}.txt").write_text(text)
    clean_corpus(raw, root / "data" / "clean", CleanConfig(min_chars=10), (EOT,))
    return root


def test_the_mutations_reach_every_kind_of_case():
    kinds = [mutate(DEFAULT, random.Random(seed)) for seed in range(CASES)]
    assert len(set(kinds)) > 0.9 * CASES, "the seeds give different files"


@pytest.mark.parametrize("seed", range(CASES))
def test_any_params_file_is_accepted_or_refused_in_one_line(corpus, seed):
    params = mutate(DEFAULT, random.Random(seed))
    (corpus / "params.yaml").write_bytes(params)
    assert_one_line_or_success(*run_bounded(corpus, "check-params", "--params", "params.yaml"), params)
    if seed < STAGE_CASES:
        assert_one_line_or_success(*run_bounded(corpus, "tokenizer", "--params", "params.yaml"), params)


@pytest.mark.parametrize(("value", "problem"), [
    (alias_bomb(), "data.source: aliases expand it to more than"),
    ("&r [*r]", "an alias refers to a node that contains it"),
    ("[" * 5000 + "]" * 5000, "nested too deeply"),
    ("1" + "0" * 5000, "invalid value"),
])
def test_params_that_would_exhaust_the_loader_are_refused_at_once(tmp_path, value, problem):
    """The alias bomb took 75 s to a MemoryError: the error message built the repr of a billion strings."""
    (tmp_path / "params.yaml").write_text(DEFAULT.replace("source: shakespeare", f"source: {value}"))
    result, elapsed = run_bounded(tmp_path, "check-params")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and problem in result.stderr, result.stderr
    assert elapsed < 2.0


def test_a_duplicate_key_is_refused_naming_it_and_its_line(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `lr:` would silently win over the first."""
    (tmp_path / "params.yaml").write_text(DEFAULT.replace("  lr: 0.016", "  lr: 0.016\n  lr: 0.5"))
    line = DEFAULT[:DEFAULT.index("  lr: 0.016")].count("\n") + 2
    result = run_stage(tmp_path, "check-params")
    assert result.returncode == 2 and f"params.yaml, line {line}: duplicate key 'lr'" in result.stderr, result.stderr


def test_a_long_value_is_shown_cut_short_in_the_error(tmp_path):
    (tmp_path / "params.yaml").write_text(DEFAULT.replace("  arch: modern", "  arch: " + "x" * 100_000))
    result = run_stage(tmp_path, "check-params")
    assert result.returncode == 2 and "model.arch" in result.stderr and len(result.stderr) < 300, result.stderr
