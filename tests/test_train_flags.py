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


def test_max_tokens_is_a_budget_some_machine_finishes():
    assert train_flags.token_budget("1e15") == train_flags.MAX_TOKENS
    for bad in ("1e30", "2e15", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a count in \[1, 1e\+15\]"):
            train_flags.token_budget(bad)


@pytest.mark.parametrize("post_ln", [False, True])
def test_num_params_counts_what_init_makes(post_ln):
    import jax
    import jax.numpy as jnp

    import model as bert

    cfg = bert.make_config("tiny", 203, num_layers=2, hidden_size=64, num_heads=2, post_ln=post_ln)
    shapes = jax.eval_shape(bert.mlm_model(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                            jnp.zeros((1, 2), jnp.int32))
    assert bert.num_params(cfg) == sum(x.size for x in jax.tree.leaves(shapes))


class FakeDevice:
    device_kind = "Fake GPU"

    def __init__(self, limit):
        self.limit = limit

    def memory_stats(self):
        return None if self.limit is None else {"bytes_limit": self.limit}


def test_memory_check_refuses_a_model_whose_training_state_cannot_fit():
    import model as bert

    cfg = bert.make_config("mini", 30522)
    need = train_flags.TRAIN_BYTES_PER_PARAM * bert.num_params(cfg)
    train_flags.check_memory(cfg, FakeDevice(need), 1)
    with pytest.raises(train_flags.UserError, match=r"needs at least .* more than its .* GiB of Fake GPU memory"):
        train_flags.check_memory(cfg, FakeDevice(need - 1), 1)
    huge = bert.make_config("mini", 30522, num_layers=1_000_000)
    with pytest.raises(train_flags.UserError, match="GiB of RAM; choose a smaller --model"):
        train_flags.check_memory(huge, FakeDevice(None), 1)  # CPU: the host's RAM
