"""Tests for plot_log.py on synthetic tensorboardX logs written with train.py's tags: three runs resumed into one
tb/ folder, read back without the tensorboard package (a real train.py log: tests/test_train.py)."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import common  # noqa: E402
import plot_log  # noqa: E402

T = plot_log.TAGS
# (run, first step, last step, checkpoint): run 1 evaluates at 400 and 800, dies at 900 (last checkpoint 600);
# run 2 resumes at 600 and is stopped at 800; run 3 resumes at 800 and finishes at 1200. Steps are tokens.
RUNS = [(1, 100, 900), (2, 700, 800), (3, 900, 1200)]


def write_runs(tb: str) -> None:
    """Values encode (run, step): train loss run*100 + step/100, tokens/s run*1000 + step (every 200 tokens),
    eval loss run*10 + step/100 (every 400 tokens); all exact in float32."""
    from tensorboardX import SummaryWriter

    for run, first, last in RUNS:
        with SummaryWriter(tb, filename_suffix=f".run{run}") as writer:  # one second can hold several runs
            for step in range(first, last + 1, 100):
                writer.add_scalar(T["loss"], run * 100 + step / 100, step)
                writer.add_scalar(T["lr"], step / 1e6, step)
                writer.add_scalar(T["batch_size"], 8 if step < 500 else 16, step)
                if step % 200 == 0:
                    writer.add_scalar(T["tokens_per_s"], run * 1000 + step, step)
                if step % 400 == 0:
                    writer.add_scalar(T["eval_loss"], run * 10 + step / 100, step)


EXPECTED = [  # run 1's values from 900 on (after run 2's first step, 700) are replaced, its eval at 800 too
    dict(tokens=400, train_loss=102.5, val_loss=14.0, tokens_per_s=1300.0),  # run 1: 101..104; 1200, 1400
    dict(tokens=800, train_loss=156.5, val_loss=28.0, tokens_per_s=2200.0),  # 105, 106, 207, 208; 1600, 2800
    dict(tokens=1200, train_loss=310.5, val_loss=42.0, tokens_per_s=4100.0),  # run 3: 309..312; 4000, 4200
]


@pytest.fixture
def out_dir(tmp_path) -> str:
    write_runs(str(tmp_path / "out" / "tb"))
    return str(tmp_path / "out")


def test_resumed_runs_merge_into_rows_and_tables(out_dir, tmp_path):
    scalars = plot_log.read_log(out_dir)
    assert list(scalars[T["loss"]]) == list(range(100, 1201, 100))
    assert scalars[T["loss"]][900] == 309.0 and scalars[T["loss"]][600] == 106.0  # run 1's 900 is gone
    assert plot_log.eval_rows(scalars) == EXPECTED
    rows = plot_log.main([out_dir, "--out", str(tmp_path / "results"), "--no_plot"])
    assert rows == EXPECTED
    with open(tmp_path / "results" / "log.json") as f:
        assert json.load(f)["rows"] == EXPECTED
    table = (tmp_path / "results" / "log.md").read_text().splitlines()
    assert table[0] == "| tokens | train loss | val loss | tokens/s |" and len(table) == 2 + len(EXPECTED)
    assert table[-1] == "| 1.2k | 310.5000 | 42.0000 | 4.1k |"
    assert sorted(os.listdir(tmp_path / "results")) == ["log.json", "log.md"]  # no temp files left


def test_a_resumed_run_replaces_everything_from_its_first_step_on():
    first = {"train/loss": [(1, 1.0), (2, 2.0), (3, 3.0), (2, 2.5)], "eval/loss": [(2, 9.0), (3, 9.5)]}
    resumed = {"train/loss": [(2, 20.0)]}  # stopped before step 3: the first run's step 3 must not linger
    assert plot_log.merge_runs([first]) == {"train/loss": {1: 1.0, 2: 2.5, 3: 3.0}, "eval/loss": {2: 9.0, 3: 9.5}}
    assert plot_log.merge_runs([first, resumed]) == {"train/loss": {1: 1.0, 2: 20.0}, "eval/loss": {}}


def test_truncated_last_record_is_ignored(out_dir):
    tb = os.path.join(out_dir, "tb")
    last = max(os.listdir(tb))  # run 3's file
    with open(os.path.join(tb, last), "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00\x00\x00")  # a writer killed inside the next record's header
    assert plot_log.eval_rows(plot_log.read_log(out_dir)) == EXPECTED


def test_png(out_dir):
    pytest.importorskip("matplotlib")
    plot_log.main([out_dir])
    with open(os.path.join(out_dir, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {"loss.png", "log.md", "log.json"} <= set(os.listdir(out_dir))


def test_help_explains_every_flag():
    assert all(action.help for action in plot_log.build_parser()._actions)


BAD_INPUTS = {"no_tb": "no tensorboard event files", "not_events": "corrupt record",
              "other_scalars": "not a train.py log"}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, tmp_path, capsys):
    tb = tmp_path / "tb"
    if case == "not_events":
        tb.mkdir()
        (tb / "events.out.tfevents.1.host").write_bytes(b"not a tfrecord file at all")
    elif case == "other_scalars":
        from tensorboardX import SummaryWriter

        with SummaryWriter(str(tb)) as writer:
            writer.add_scalar("dev/accuracy", 0.5, 1)
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: plot_log.main([str(tmp_path)]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and BAD_INPUTS[case] in err[0]


def test_format_count_rounds_small_rates_and_scales_large_ones():
    assert [plot_log.format_count(n) for n in (571.101, 1234, 12_345_678, 3e9)] == ["571", "1.2k", "12.35M", "3.00B"]
