"""train_flags.py: token counts, --help, and every flag classified as deciding the numbers or not."""
import argparse

import pytest

import train
import train_flags


def test_token_counts():
    assert [train_flags.parse_count(s) for s in ("500k", "10M", "1.5B", "1e6", "1_000", "42")] == \
        [500_000, 10_000_000, 1_500_000_000, 1_000_000, 1000, 42]
    for bad in ("ten", "-5", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            train_flags.parse_count(bad)


def test_help_explains_every_flag(capsys):
    parser = train_flags.build_parser(train.__doc__)
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help"
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--micro_batch_size" in out and "Pretrain BERT by masked-language modelling" in out


def test_every_flag_either_decides_the_numbers_or_not():
    """A new flag must be put in one of the two sets: a resumed run reports changes to NUMERIC_FLAGS only."""
    flags = {action.dest for action in train_flags.build_parser("")._actions} - {"help"}
    assert train_flags.OPERATIONAL_FLAGS | train_flags.NUMERIC_FLAGS == flags
    assert not train_flags.OPERATIONAL_FLAGS & train_flags.NUMERIC_FLAGS
    assert train_flags.PER_PROCESS_FLAGS <= train_flags.OPERATIONAL_FLAGS
