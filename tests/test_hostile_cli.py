"""Command-line values at their extremes (issue 31, items 11 and 12): every flag of generate, evaluate --text and
export-hf, given each value of a table of extremes (0, -1, 10**30, nan, inf, empty, blank, very long, not
UTF-8), either works (exit 0, sane output) or is refused with exit code 2 and one line naming the flag or the
path; never a traceback (exit 1), never a run without end."""

import os
import time
from pathlib import Path

import pytest

from llm.configs.evaluate import MAX_NEW_TOKENS
from tests.conftest import run_stage, run_stage_process

NOT_UTF8 = os.fsdecode(b"caf\xe9-\xff")  # what Python makes of a file name or argument that is not UTF-8
LONG = "x" * 5_000
INTS = ["0", "-1", "1", "7", str(2**63), str(10**30), str(-10**30), "nan", "inf", "", " ", "1e3", "3.5", "0x10",
        LONG, NOT_UTF8, str(MAX_NEW_TOKENS + 1)]
FLOATS = ["0", "-0", "-1", "1", "5e-324", "1e-320", "1e30", "1e308", "1e309", "-1e309", "nan", "-nan", "inf",
          "-inf", "Infinity", "", " ", "0x1p3", LONG, NOT_UTF8]
NON_FINITE = {"1e309", "-1e309", "nan", "-nan", "inf", "-inf", "Infinity"}
TEXTS = ["", " ", "\n", "\x00", LONG * 20, NOT_UTF8, "<|endoftext|>", "\udcff" * 3, "🎭" * 1000, "\u202e\u0301"]


def generate_cases() -> list[tuple[str, str]]:
    cases = [(flag, value) for flag in ("--max-new-tokens", "--top-k", "--seed") for value in INTS]
    cases += [(flag, value) for flag in ("--temperature", "--top-p") for value in FLOATS]
    cases += [("--prompt", value) for value in TEXTS]
    cases += [(flag, value) for flag in ("--model", "--params") for value in ("", ".", "/", "/dev/null", "/proc",
                                                                              LONG, NOT_UTF8, "/nonexistent")]
    return cases


def check_outcome(result, flag: str, value: str, seconds: float) -> None:
    """Exit 0 with text on stdout, or exit 2 and one line on stderr that names `flag` or the value's path."""
    case = (flag, value[:40], result.returncode, result.stderr[-600:])
    assert seconds < 30, case  # no value makes a command run without end
    assert result.returncode in (0, 2), case
    assert "Traceback" not in result.stderr, case
    if result.returncode == 2:
        line = result.stderr.strip()
        assert "\n" not in line and line.startswith("error: "), case
        named = (flag, flag.lstrip("-").replace("-", "_"), "params", "config.json", "tokenizer")
        # the value as a path ("" is "."), printed as Python prints a name that is not UTF-8
        shown = str(Path(value)).encode("utf-8", "backslashreplace").decode()
        assert any(name in line for name in named) or f"{shown}:" in line or f"{shown}/" in line, case


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import _sample_tokenizer_json, make_model_dir

    work = tmp_path_factory.mktemp("hostile_cli")
    (work / "tokenizer.json").write_text(_sample_tokenizer_json(400))
    return make_model_dir(work / "model", work / "tokenizer.json")


@pytest.mark.parametrize(("flag", "value"), generate_cases(), ids=lambda v: repr(v)[:24])
def test_generate_takes_or_refuses_every_extreme_value_in_one_line(tmp_path, model_dir, flag, value):
    args = {"--model": str(model_dir), "--max-new-tokens": "4", "--temperature": "1", "--seed": "1", flag: value}
    start = time.monotonic()
    result = run_stage(tmp_path, "generate", *(item for pair in args.items() for item in pair))
    check_outcome(result, flag, value, time.monotonic() - start)
    if flag in ("--temperature", "--top-p") and value in NON_FINITE:
        assert result.returncode == 2 and "finite" in result.stderr  # as params refuse .inf and .nan (item 11)


def test_generate_bounds_max_new_tokens_and_says_so(tmp_path, model_dir):
    result = run_stage(tmp_path, "generate", "--model", model_dir, "--max-new-tokens", MAX_NEW_TOKENS + 1)
    assert result.returncode == 2 and "--max-new-tokens" in result.stderr and str(MAX_NEW_TOKENS) in result.stderr


@pytest.mark.parametrize("value", ["", ".", "/", "/dev/null", "/proc/self/mem", "/nonexistent", LONG, NOT_UTF8,
                                   "empty.txt", "binary.txt", "not_utf8_name"], ids=lambda v: repr(v)[:24])
def test_evaluate_text_takes_or_refuses_every_extreme_path_in_one_line(tmp_path, model_dir, value):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00text")
    if value == "not_utf8_name":
        value = NOT_UTF8 + ".txt"
        (tmp_path / value).write_text("To be, or not to be")
    start = time.monotonic()
    result = run_stage(tmp_path, "evaluate", "--model", model_dir, "--text", value)
    check_outcome(result, "--text", value, time.monotonic() - start)
    if value.endswith(".txt") and value.startswith(NOT_UTF8):
        assert result.returncode == 0 and '"bpb"' in result.stdout


@pytest.mark.parametrize("value", ["", ".", "/", "/dev/null", "/proc/self", LONG, NOT_UTF8, "new/" + NOT_UTF8,
                                   "x" * 255 + "/y", "/proc/llm-test/out"], ids=lambda v: repr(v)[:24])
def test_export_hf_takes_or_refuses_every_extreme_out_in_one_line(tmp_path, model_dir, value):
    start = time.monotonic()
    result = run_stage(tmp_path, "export-hf", "--model", model_dir, "--out", value)
    check_outcome(result, "--out", value, time.monotonic() - start)


def test_usage_errors_are_one_line_in_a_real_process(tmp_path, model_dir):
    """What click refuses before a command runs (a value of the wrong type, out of range, an unknown or missing
    option) is one line too, as the interpreter prints it; a file name that is not UTF-8 is printed escaped."""
    for args in (["generate", "--top-k", "1e3"], ["generate", "--max-new-tokens", "0"], ["export-hf"],
                 ["generate", "--no-such-flag"], ["evaluate", "--model", str(model_dir), "--text", NOT_UTF8]):
        result = run_stage_process(tmp_path, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), (args, result.stderr)


def test_params_bound_max_new_tokens_as_the_flag_does():
    from llm.configs.evaluate import EvaluateConfig
    from llm.errors import ConfigError

    for value in (0, MAX_NEW_TOKENS + 1, 10**12):
        with pytest.raises(ConfigError, match=r"^evaluate\.max_new_tokens: must be in \[1, 100000\]"):
            EvaluateConfig(max_new_tokens=value)
    assert EvaluateConfig(max_new_tokens=MAX_NEW_TOKENS).max_new_tokens == MAX_NEW_TOKENS
