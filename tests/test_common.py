"""common.py's flag domains and the one error path of every script's parser."""
import argparse

import pytest

import common


@pytest.mark.parametrize("kind, good, bad", [
    (common.positive_int, {"1": 1, "42": 42, "1_000": 1000}, ["0", "-3", "1.5", "abc", "", "1e3"]),
    (common.non_negative_int, {"0": 0, "7": 7}, ["-1", "nan"]),
    (common.seed, {"0": 0, str(common.MAX_SEED): common.MAX_SEED}, ["-1", str(2**32), str(2**63), str(2**70)]),
    (common.positive_float, {"1e-3": 1e-3, "5": 5.0}, ["0", "-1", "nan", "inf", "-inf", "x"]),
    (common.non_negative_float, {"0": 0.0, "2.5": 2.5}, ["-1e-9", "nan", "inf"]),
    (common.fraction, {"0": 0.0, "1": 1.0, "0.5": 0.5}, ["1.0001", "-0.1", "nan"]),
    (common.float_in(0, 1, open_high=True), {"0": 0.0, "0.999": 0.999}, ["1", "1.0", "-0.5", "nan"]),
    (common.float_in(0, 1, open_low=True, open_high=True), {"0.15": 0.15}, ["0", "1"]),
    (common.finite_float, {"-3": -3.0, "1e300": 1e300}, ["nan", "inf", "1e400"]),
])
def test_domains(kind, good, bad):
    assert {text: kind(text) for text in good} == good
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be .*, got {text!r}"):
            kind(text)


def test_domain_messages_say_what_is_allowed():
    cases = [(common.int_in(6, 100), "must be an integer in [6, 100]"),
             (common.positive_int, "must be an integer >= 1"),
             (common.float_in(0, 1, open_high=True), "must be a number in [0, 1)"),
             (common.positive_float, "must be a number > 0"), (common.finite_float, "must be a number (finite)")]
    for kind, says in cases:
        with pytest.raises(argparse.ArgumentTypeError) as e:
            kind("nan")
        assert str(e.value) == f"{says}, got 'nan'"


def parse_error(argv: list[str], capsys) -> str:
    p = common.ArgumentParser("a test")
    p.add_argument("--n", type=int)
    p.add_argument("--rate", type=common.float_in(0, 1))
    p.add_argument("--mode", choices=["fast", "slow"])
    p.add_argument("--need", required=True)
    with pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    captured = capsys.readouterr()
    assert e.value.code == 2 and captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_parser_errors_are_one_line_naming_the_flag(capsys):
    need = ["--need", "x"]
    assert parse_error([*need, "--rate", "2"], capsys) == "error: --rate must be a number in [0, 1], got '2'"
    assert parse_error([*need, "--n", "abc"], capsys) == "error: --n must be an integer, got 'abc'"
    assert parse_error([*need, "--mode", "warp"], capsys) == \
        "error: --mode: invalid choice: 'warp' (choose from 'fast', 'slow')"
    assert parse_error([], capsys) == "error: the following arguments are required: --need"
    assert parse_error([*need, "--bogus"], capsys) == "error: unrecognized arguments: --bogus"
    assert "is written --rate=VALUE" in parse_error([*need, "--rate", "-1e-3"], capsys)


def test_help_keeps_the_whole_usage(capsys):
    p = common.ArgumentParser("Line one.\n\n    indented example")
    p.add_argument("--rate", type=common.fraction, help="a rate")
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: ") and "--rate RATE  a rate" in out
    assert "    indented example" in out  # the description keeps its layout
    assert p.parse_args(["--rate", "0.5"]).rate == 0.5
