"""Tests for train.py on a tiny synthetic corpus: schedules, learning, gradient accumulation, resume, two devices,
fp16 loss scaling, NaN handling, atomic checkpoints, signals, two processes and bad input.

Compiling dominates the run time, so almost every run shares one configuration (run_flags) and a persistent compilation
cache; the subprocesses (two devices, CLI errors) start at once in the background and are collected later.
"""
import io
import json
import math
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
from contextlib import redirect_stdout

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache  # noqa: E402

import checkpoint  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import model as bert  # noqa: E402
import plot_log  # noqa: E402
import tokenizer  # noqa: E402
import train  # noqa: E402
import train_flags  # noqa: E402
from common import UserError  # noqa: E402
from conftest import damage_checkpoint, fill_disk  # noqa: E402

PHRASES = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
           "all that glitters is not gold", "the early bird catches the worm", "actions speak louder than words",
           "every cloud has a silver lining", "fortune favours the bold", "knowledge is power and time is money"]
SEQ_LEN, STEP_TOKENS = 32, 16 * 32


def make_docs(seed: int, n: int) -> list[str]:
    """Documents of one fixed phrase repeated: the window tells the phrase, the neighbours the masked word."""
    rng = random.Random(seed)
    return [" ".join([rng.choice(PHRASES)] * rng.randint(3, 8)) for _ in range(n)]


def run_flags(corpus, out_dir, *extra) -> list[str]:
    """The shared configuration: 1-layer H64 BERT, batch ramp 8 -> 16 (micro 8, so 1 then 2 microbatches), 112+
    steps, eval and checkpoints on token multiples. Later flags override earlier ones."""
    return ["--data_dir", corpus["data"], "--tokenizer", corpus["tokenizer"], "--out_dir", str(out_dir),
            "--model", "tiny", "--num_layers", "1", "--hidden_size", "64", "--num_heads", "2", "--seq_len",
            str(SEQ_LEN), "--precision", "fp32", "--batch_size", "16", "--batch_size_start", "8",
            "--micro_batch_size", "8", "--batch_warmup_frac", "0.1", "--max_tokens", "57344", "--lr", "5e-3",
            "--warmup_frac", "0.1", "--log_every", "20", "--eval_every", "20000", "--eval_windows", "32",
            "--ckpt_every", "16384", "--keep_ckpts", "3", "--peak_flops", "1e11", *extra]


def subprocess_env(cache_dir: str, devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


# ------------------------------------------------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A persistent compilation cache for this module's runs (in-process and subprocesses), then the old setting."""
    path = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield path
    for name, value in saved.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpus")
    paths = {"tokenizer": str(root / "tokenizer.json"), "other_tokenizer": str(root / "other.json"),
             "data": str(root / "data"), "root": str(root)}
    docs = make_docs(0, 400)
    tokenizer.train_tokenizer(docs, 200).save(paths["tokenizer"])
    tokenizer.train_tokenizer(docs, 150).save(paths["other_tokenizer"])
    meta = data.prepare(docs, paths["tokenizer"], paths["data"], val_docs=40, progress=False)
    paths["vocab_size"] = meta["vocab_size"]
    return paths


@pytest.fixture(scope="module")
def background(corpus, cache_dir, tmp_path_factory):
    """Subprocesses started together at the beginning: the two-device run and the CLI cases that need one."""
    tmp = tmp_path_factory.mktemp("background")
    two_dev = ("import json, sys, train; h = train.main(sys.argv[1:]); "
               "print(json.dumps(dict(loss=h['loss'], eval=h['eval'], num_devices=h['num_devices'])))")
    procs = {"two_devices": start(["-c", two_dev, *run_flags(corpus, tmp / "two_dev", "--micro_batch_size", "4")],
                                  subprocess_env(cache_dir, devices=2))}
    for name, (extra, _, devices, in_subprocess) in BAD_INPUTS.items():
        if in_subprocess:
            extra = [x.format(**corpus) for x in extra]
            procs[name] = start(["train.py", *run_flags(corpus, tmp / name, *extra)],
                                subprocess_env(cache_dir, devices))
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(scope="module")
def run(corpus, cache_dir, background, tmp_path_factory):
    """The reference run, uninterrupted, in-process: its history, out_dir and stdout."""
    out = tmp_path_factory.mktemp("run") / "out"
    buffer = io.StringIO()
    with redirect_stdout(buffer):
        history = train.main(run_flags(corpus, out))
    return dict(history=history, out=str(out), stdout=buffer.getvalue())


# ------------------------------------------------------------------------------------------------------------------
# Pure functions

def test_one_cycle_lr_schedule_shape():
    kw = dict(peak=1e-3, max_tokens=10_000, warmup_frac=0.1, final_frac=0.1)
    tokens = np.arange(0, 10_001, 50)
    lrs = np.array([train.lr_at(t, **kw) for t in tokens])
    assert lrs[0] == 0.0 and train.lr_at(10, **kw) == pytest.approx(1e-3 * 10 / 1000)
    assert np.all(np.diff(lrs[tokens <= 1000]) > 0)  # warmup rises to the peak ...
    assert train.lr_at(1000, **kw) == pytest.approx(1e-3) and lrs.max() == pytest.approx(1e-3)
    assert np.all(np.diff(lrs[tokens >= 1000]) < 0)  # ... then decays monotonically ...
    assert train.lr_at(10_000, **kw) == pytest.approx(1e-4) and train.lr_at(20_000, **kw) == pytest.approx(1e-4)
    mid = (1e-3 + 1e-4) / 2  # ... to the final value; cos lies above linear in the first half of the decay
    assert train.lr_at(5500, **kw) == pytest.approx(mid) == train.lr_at(5500, **kw, anneal="linear")
    assert train.lr_at(3000, **kw) > train.lr_at(3000, **kw, anneal="linear")
    assert train.lr_at(0, peak=1.0, max_tokens=100, warmup_frac=0.0, final_frac=0.0) == 1.0  # no warmup


def test_batch_size_schedule_rounds_and_bounds_recompiles():
    kw = dict(start=32, end=256, ramp_tokens=100_000, multiple=32)
    assert train.batch_size_at(0, **kw) == 32 and train.batch_size_at(100_000, **kw) == 256
    assert train.batch_size_at(50_000, **kw) == 160  # 144 rounds to the nearest multiple of 32
    assert train.batch_size_at(10**9, **kw) == 256
    # Simulate a run: batch sizes are multiples of micro x devices, never decrease, and take each of the
    # 8 possible accumulation counts (so at most 8 compilations) in order.
    tokens, sizes = 0, []
    while tokens < 300_000:
        sizes.append(train.batch_size_at(tokens, **kw))
        tokens += sizes[-1] * 16
    counts = [s // 32 for s in sizes]
    assert all(s % 32 == 0 for s in sizes) and counts == sorted(counts)
    assert sorted(set(counts)) == list(range(1, 9))
    assert train.batch_size_at(5, start=64, end=64, ramp_tokens=0, multiple=8) == 64
    assert train.batch_size_at(50, start=64, end=16, ramp_tokens=100, multiple=16) == 48  # ramping down works too


def test_sequence_length_warmup_doubles_in_equal_stages():
    at = lambda tokens: train.seq_len_at(tokens, start=16, end=128, warmup_tokens=300)
    assert [at(t) for t in (0, 99, 100, 199, 200, 299, 300, 10**6)] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert train.seq_len_at(0, start=128, end=128, warmup_tokens=300) == 128  # no warmup
    assert train.seq_len_at(0, start=16, end=128, warmup_tokens=0) == 128


def test_sequence_length_warmup_trains_on_short_windows_with_the_same_tokens_per_step(corpus, cache_dir, tmp_path):
    h = train.main(run_flags(corpus, tmp_path, "--seq_len_start", "8", "--seq_warmup_frac", "0.5",
                             "--batch_size_start", "16", "--micro_batch_size", "16", "--max_tokens", "8192"))
    assert len(h["loss"]) == 8192 // STEP_TOKENS and all(np.isfinite(h["loss"]))  # 16 x 32 tokens every step
    reader = data.TokenReader(corpus["data"], "train", SEQ_LEN, 0)
    assert reader.batch(3, 64, 8).shape == (64, 8)
    offsets = np.random.default_rng([0, 3]).integers(0, reader.num_tokens - 8 + 1, size=2)
    assert (reader.batch(3, 2, 8) == [reader.tokens[o:o + 8] for o in offsets]).all()  # contiguous windows


def test_intervals():
    assert train.crossed(90, 110, 100) and not train.crossed(100, 199, 100) and not train.crossed(0, 500, 0)


# ------------------------------------------------------------------------------------------------------------------
# Training runs

def test_loss_falls_and_run_writes_outputs(run, corpus):
    h, chance = run["history"], math.log(corpus["vocab_size"])
    assert abs(h["loss"][0] - chance) < 0.5
    assert np.mean(h["loss"][-10:]) < chance - 1.5
    tokens = np.cumsum(np.array(h["batch_size"]) * SEQ_LEN)  # tokens seen after each step

    def steps_crossing(every):  # 1-based steps after which tokens passed a multiple of `every`
        return [i + 1 for i in range(len(tokens)) if tokens[i] // every > (tokens[i - 1] if i else 0) // every]

    assert [e["step"] for e in h["eval"]] == steps_crossing(20000) + [len(tokens)]  # and at the end
    assert h["eval"][-1]["loss"] < chance - 1.5 and h["eval"][-1]["loss"] < h["eval"][0]["loss"]
    # The batch ramps 8 -> 16 in multiples of 8 and each accumulation count compiles exactly once.
    assert h["batch_size"][0] == 8 and h["batch_size"][-1] == 16 and set(h["batch_size"]) == {8, 16}
    assert h["compiles"] == 2
    assert "step 20 | tokens" in run["stdout"] and "eval step 46 |" in run["stdout"]
    assert "mfu" in run["stdout"].splitlines()[-2]
    # Checkpoints every 16384 tokens and at the end, the last 3 kept; tensorboard events written.
    saved = steps_crossing(16384)
    assert len(saved) == 3 and saved[-1] < len(tokens)
    names = sorted(n for n in os.listdir(run["out"]) if n.startswith("ckpt_"))
    assert names == [f"ckpt_{s:08d}" for s in saved[1:] + [len(tokens)]]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(os.path.join(run["out"], "tb")))
    params, state = checkpoint.load_checkpoint(run["out"])  # an out_dir means its latest checkpoint
    assert state["step"] == len(h["loss"]) and state["tokens_seen"] == tokens[-1] >= 57344
    assert state["config"]["vocab_size"] == corpus["vocab_size"] and state["precision"] == "fp32"
    assert params["bert/embeddings/word"]["embeddings"].shape == (corpus["vocab_size"], 64)
    with open(state["tokenizer_path"], "rb") as f, open(corpus["tokenizer"], "rb") as g:
        assert f.read() == g.read()
    cfg = bert.BertConfig(**state["config"])  # the checkpoint alone rebuilds the model
    shapes = jax.eval_shape(bert.mlm_model(cfg).init, jax.random.PRNGKey(0), np.zeros((1, 8), np.int32),
                            np.zeros((1, 2), np.int32))
    assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, params)


def test_the_tensorboard_log_reads_back_through_plot_log(run, tmp_path):
    """The event files train.py writes, read by plot_log.py: every tag, and the numbers the run returned."""
    h = run["history"]
    scalars = plot_log.read_log(run["out"])
    assert set(scalars) == set(plot_log.TAGS.values())
    assert list(scalars[plot_log.TAGS["loss"]].values()) == pytest.approx(h["loss"], rel=1e-6)
    assert list(scalars[plot_log.TAGS["batch_size"]].values()) == h["batch_size"]
    rows = plot_log.main([run["out"], "--out", str(tmp_path), "--no_plot"])
    assert [r["tokens"] for r in rows] == [e["tokens"] for e in h["eval"]]
    assert [r["val_loss"] for r in rows] == pytest.approx([e["loss"] for e in h["eval"]], rel=1e-6)


def test_resume_repeats_the_uninterrupted_run(run, corpus, tmp_path):
    """Resume from a mid-run checkpoint with only --out_dir --resume: the saved flags drive it."""
    mid = sorted(n for n in os.listdir(run["out"]) if n.startswith("ckpt_"))[0]
    k = int(mid[len("ckpt_"):])
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(os.path.join(run["out"], mid), out / mid)
    resumed = train.main(["--out_dir", str(out), "--resume"])
    assert resumed["start_step"] == k and 0 < k < len(run["history"]["loss"])
    np.testing.assert_allclose(resumed["loss"], run["history"]["loss"][k:], rtol=1e-6)
    assert resumed["eval"][-1]["loss"] == pytest.approx(run["history"]["eval"][-1]["loss"], rel=1e-6)
    with pytest.raises(UserError, match="not the tokenizer of checkpoint"):
        train.main(["--out_dir", str(out), "--resume", "--tokenizer", corpus["other_tokenizer"]])
    with pytest.raises(UserError, match="model differs from checkpoint"):
        train.main(["--out_dir", str(out), "--resume", "--hidden_size", "128"])
    with pytest.raises(UserError, match="pass --resume"):
        train.main(run_flags(corpus, out))


@pytest.mark.parametrize("fault", ["truncate", "bitflip", "empty_state", "no_manifest_no_arrays", "state_step_abc"])
def test_resume_skips_a_damaged_checkpoint(run, tmp_path, capsys, fault):
    """The newest checkpoint damaged after it was written: --resume names it, takes the one before, and ends with
    the uninterrupted run's weights."""
    names = sorted(n for n in os.listdir(run["out"]) if n.startswith("ckpt_"))[:2]
    out = tmp_path / "out"
    for name in names:
        shutil.copytree(os.path.join(run["out"], name), out / name)
    damage_checkpoint(str(out / names[1]), fault)
    resumed = train.main(["--out_dir", str(out), "--resume"])
    assert f"skipped damaged checkpoint {out / names[1]}" in capsys.readouterr().err
    assert resumed["start_step"] == int(names[0][len("ckpt_"):])
    final = checkpoint.latest_checkpoint(run["out"])
    assert checkpoint.latest_checkpoint(str(out)) == str(out / os.path.basename(final))
    got = checkpoint.read_arrays(str(out / os.path.basename(final)))
    for key, value in checkpoint.read_arrays(final).items():
        np.testing.assert_array_equal(got[key], value)


def test_two_devices_match_one_device(run, background):
    rc, out, err = finish(background["two_devices"])
    assert rc == 0, err[-3000:]
    two = json.loads(out.strip().splitlines()[-1])
    assert two["num_devices"] == 2
    # Same batches, masks and math; only the order of float sums differs (~1e-7 at first). Training amplifies
    # that chaotically once the model starts using context (~step 60 here), so compare the steps before.
    assert two["loss"][0] == pytest.approx(run["history"]["loss"][0], rel=1e-6)
    np.testing.assert_allclose(two["loss"][:40], run["history"]["loss"][:40], rtol=1e-4)
    assert len(two["loss"]) == len(run["history"]["loss"])
    assert [e["step"] for e in two["eval"]] == [e["step"] for e in run["history"]["eval"]]
    assert two["eval"][0]["loss"] == pytest.approx(run["history"]["eval"][0]["loss"], rel=1e-3)


def test_gradient_accumulation_equals_one_big_batch(corpus, cache_dir, tmp_path):
    """One step on the same 32 windows with the same params and masks: 4 microbatches of 8 == 1 batch of 32."""
    results = []
    for micro in ("8", "32"):
        history = train.main(run_flags(corpus, tmp_path / micro, "--batch_size", "32", "--batch_size_start", "32",
                                       "--micro_batch_size", micro, "--max_tokens", str(32 * SEQ_LEN),
                                       "--eval_windows", "0", "--warmup_frac", "0", "--final_lr_frac", "1"))
        results.append((history, checkpoint.read_arrays(checkpoint.latest_checkpoint(str(tmp_path / micro)))))
    (h2, a2), (h1, a1) = results
    assert h2["compiles"] == h1["compiles"] == 1
    assert h2["loss"][0] == pytest.approx(h1["loss"][0], rel=1e-6)
    assert h2["grad_norm"][0] == pytest.approx(h1["grad_norm"][0], rel=1e-5)
    assert set(a2) == set(a1)
    for part in ("/mu/", "/nu/"):  # Adam's moments after one step: 0.1 g and 0.02 g^2 of the (clipped) gradient g
        x2, x1 = (np.concatenate([a[k].ravel() for k in sorted(a) if part in k]) for a in (a2, a1))
        assert np.linalg.norm(x2 - x1) <= 1e-5 * np.linalg.norm(x1)
        np.testing.assert_allclose(x2, x1, rtol=1e-4, atol=1e-5 * np.abs(x1).max())  # ~0 entries: rounding noise
    for key in a1:  # Adam's first step moves params by lr g / (|g| + eps), lr = 5e-3: noise in g ~ eps shows up
        if key.startswith("params/"):  # as ~1e-6 differences, a 1e-3 fraction of a step
            np.testing.assert_allclose(a2[key], a1[key], rtol=1e-5, atol=5e-6, err_msg=key)


def test_decode_all_gives_the_same_loss(corpus, cache_dir, tmp_path):
    """One step (2 microbatches of 8) from the same seed: decoding all T positions, with zero weight off the masked
    ones, gives the loss, accuracy and gradient of decoding the masked positions only; the flag is saved."""
    masked, every = (train.main(run_flags(corpus, tmp_path / name, "--batch_size_start", "16", "--max_tokens",
                                          str(STEP_TOKENS), "--eval_windows", "0", *extra))
                     for name, extra in (("masked", []), ("all", ["--decode_all"])))
    assert masked["compiles"] == every["compiles"] == 1
    assert every["loss"][0] == pytest.approx(masked["loss"][0], abs=1e-5)
    assert every["accuracy"][0] == pytest.approx(masked["accuracy"][0], abs=1e-6)
    assert every["grad_norm"][0] == pytest.approx(masked["grad_norm"][0], rel=1e-5)
    assert checkpoint.read_state(checkpoint.latest_checkpoint(str(tmp_path / "all")))["args"]["decode_all"] is True
    for name, expected in (("all", True), ("masked", False)):  # --resume keeps it
        args, _ = train_flags.parse_args(["--out_dir", str(tmp_path / name), "--resume"], train.__doc__)
        assert args.decode_all is expected


def test_max_minutes_fixes_max_tokens_so_the_schedules_end_at_the_budget(corpus, cache_dir, tmp_path, capsys):
    """--max_minutes times the steps, fixes --max_tokens once (printed, saved with the flags) and trains exactly the
    run that --max_tokens would: every schedule ends, the learning rate at its final value; --resume keeps it, and
    a resumed run out of minutes stops at its deadline with a checkpoint."""
    schedules = ["--seq_len_start", "8", "--seq_warmup_frac", "0.3", "--final_lr_frac", "0.1"]
    # A short run first puts the steps of all four shapes (batch 8 or 16 x windows of 8, 16 or 32) into the
    # compilation cache, so that the budget goes to training rather than to compiling on a busy CPU.
    train.main(run_flags(corpus, tmp_path / "warm", *schedules, "--max_tokens", "8192", "--ckpt_every", "0"))
    flags = run_flags(corpus, tmp_path / "budget", *schedules, "--max_minutes", "0.25")
    del flags[flags.index("--max_tokens"):][:2]  # no cap: the budget decides
    h = train.main(flags)
    max_tokens = h["max_tokens"]
    assert h["budget"]["max_tokens"] == max_tokens > 16 * SEQ_LEN and max_tokens % (16 * SEQ_LEN) == 0
    assert f"max_tokens {max_tokens:,}" in capsys.readouterr().out
    assert not h["out_of_time"]
    state = checkpoint.read_state(checkpoint.latest_checkpoint(str(tmp_path / "budget")))
    assert state["tokens_seen"] >= max_tokens and state["args"]["max_tokens"] == max_tokens
    assert state["args"]["max_minutes"] == 0.25
    assert h["lr"][-1] == pytest.approx(0.1 * 5e-3)  # the one cycle ended
    shapes = train.steps_per_shape(max_tokens, argparse_namespace(flags), 8)
    assert len(h["loss"]) == sum(shapes.values()) and h["compiles"] == len(shapes) == 4  # ramps and stages
    assert h["batch_size"][0] == 8 and h["batch_size"][-1] == 16

    # The same run as --max_tokens: the timing steps touched a scratch copy only.
    fixed = train.main(run_flags(corpus, tmp_path / "fixed", *schedules, "--max_tokens", str(max_tokens)))
    np.testing.assert_allclose(fixed["loss"], h["loss"], rtol=1e-6)
    assert fixed["budget"] is None

    # --resume continues the saved schedule without timing again; out of minutes, it stops with a checkpoint.
    mid = sorted(n for n in os.listdir(tmp_path / "budget") if n.startswith("ckpt_"))[0]
    for name, minutes in (("resumed", []), ("late", ["--max_minutes", "1e-6"])):
        shutil.copytree(tmp_path / "budget" / mid, tmp_path / name / mid)
        resumed = train.main(["--out_dir", str(tmp_path / name), "--resume", *minutes])
        assert resumed["budget"] is None and resumed["max_tokens"] == max_tokens
        k = resumed["start_step"]
        if name == "resumed":
            np.testing.assert_allclose(resumed["loss"], h["loss"][k:], rtol=1e-6)
            assert not resumed["out_of_time"]
        else:
            assert resumed["out_of_time"] and len(resumed["loss"]) == 1  # stopped after its first step
            assert checkpoint.read_state(checkpoint.latest_checkpoint(str(tmp_path / name)))["step"] == k + 1
            assert "the schedule did not finish" in capsys.readouterr().err


def argparse_namespace(flags: list[str]):
    return train_flags.parse_args(flags, "")[0]


def test_fp16_skips_non_finite_steps_and_lowers_the_scale(run, tmp_path):
    """Continue the reference run from a checkpoint in fp16 for two steps (2 microbatches of 8 each)."""
    mid = sorted(n for n in os.listdir(run["out"]) if n.startswith("ckpt_"))[0]
    before = checkpoint.read_arrays(os.path.join(run["out"], mid))
    k, tokens = (checkpoint.read_state(os.path.join(run["out"], mid))[f] for f in ("step", "tokens_seen"))
    flags = ["--resume", "--precision", "fp16", "--max_tokens", str(tokens + 2 * STEP_TOKENS), "--eval_windows", "0",
             "--ckpt_every", str(STEP_TOKENS)]
    try:
        # A scale of 2^100 overflows the fp16 backward pass: both steps are skipped, the scale halves each time.
        shutil.copytree(os.path.join(run["out"], mid), tmp_path / "huge" / mid)
        h = train.main(["--out_dir", str(tmp_path / "huge"), *flags, "--loss_scale_init", str(2.0**100)])
        assert h["skipped_steps"] == 2 and h["loss_scale"] == [2.0**99, 2.0**98]
        for step in (k + 1, k + 2):
            after = checkpoint.read_arrays(str(tmp_path / "huge" / f"ckpt_{step:08d}"))
            assert set(after) == set(before)
            for key in before:  # params and optimiser state did not move
                np.testing.assert_array_equal(after[key], before[key], err_msg=key)
        _, state = checkpoint.load_checkpoint(str(tmp_path / "huge"))
        assert state["loss_scale"] == {"value": 2.0**98, "counter": 0} and state["skipped_steps"] == 2
        # With the default scale the same steps train.
        shutil.copytree(os.path.join(run["out"], mid), tmp_path / "normal" / mid)
        h = train.main(["--out_dir", str(tmp_path / "normal"), *flags])
        assert h["skipped_steps"] == 0 and h["loss_scale"] == [2.0**15] * 2 and np.isfinite(h["loss"]).all()
        after = checkpoint.read_arrays(checkpoint.latest_checkpoint(str(tmp_path / "normal")))
        assert after["opt_state/1/0/count"] == before["opt_state/1/0/count"] + 2
        assert not np.array_equal(after["params/bert/embeddings/word/embeddings"],
                                  before["params/bert/embeddings/word/embeddings"])
    finally:
        bert.set_precision("fp32")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train.main(run_flags(corpus, out, "--lr", "1e30", "--ckpt_every", "256", "--eval_windows", "0"))
    assert "not finite at step 2" in str(e.value.code) and "ckpt_00000001" in str(e.value.code)
    assert sorted(os.listdir(out)) == ["ckpt_00000001", "tb"]
    params, state = checkpoint.load_checkpoint(str(out))
    assert state["step"] == 1 and all(np.isfinite(x).all() for m in params.values() for x in m.values())


def test_ids_beyond_the_vocabulary_are_named_when_the_loss_is_not_finite(corpus, cache_dir, tmp_path, monkeypatch):
    """A bad id in train.bin that the start-up sample missed: the stop names it and gives no --lr advice."""
    bad = tmp_path / "data"
    shutil.copytree(corpus["data"], bad)
    tokens = np.fromfile(bad / "train.bin", np.uint16)
    offsets = np.random.default_rng([0, 1]).integers(0, len(tokens) - SEQ_LEN + 1, size=16)  # the second step's
    tokens[offsets[0] + 3] = 60000
    tokens.tofile(bad / "train.bin")
    sampled = data.find_bad_ids
    monkeypatch.setattr(data, "find_bad_ids", lambda tokens, vocab_size, sample=False, **kw:  # the sample missed it
                        None if sample else sampled(tokens, vocab_size, **kw))
    with pytest.raises(SystemExit) as e:
        train.main(run_flags(corpus, tmp_path / "out", "--data_dir", str(bad), "--eval_windows", "0",
                             "--max_tokens", "1024"))
    message = str(e.value.code)
    assert "not finite at step" in message and "not below the vocabulary size" in message and "60000" in message
    assert f"python data.py --verify --out {bad}" in message and "--lr" not in message


def test_a_full_disk_at_the_last_checkpoint_keeps_the_one_before(corpus, cache_dir, tmp_path, mounts, monkeypatch,
                                                                capsys):
    """The disk fills up before the final checkpoint: one line says what was kept, the temporary folder is gone,
    and once there is room again --resume finishes the run."""
    disk = str(tmp_path / "disk")
    if not mounts.tmpfs(disk, "64m"):
        pytest.skip(f"needs a tmpfs mount: {mounts.error}")
    out = os.path.join(disk, "out")
    saves = []
    save_checkpoint = checkpoint.save_checkpoint

    def second_fills_the_disk(*args, **kwargs):
        saves.append(args[1]["step"])
        if len(saves) == 2:
            fill_disk(disk)
        return save_checkpoint(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", second_fills_the_disk)
    flags = run_flags(corpus, out, "--max_tokens", "4096", "--ckpt_every", "2048", "--eval_windows", "0")
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: train.main(flags))
    err = capsys.readouterr().err
    first, last = saves
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write {out}/ckpt_{last:08d}: No space left on device; the checkpoint of "
                          f"step {last} is not saved, the newest one kept is {out}/ckpt_{first:08d}: make room")
    assert sorted(os.listdir(out)) == [f"ckpt_{first:08d}", "tb"]  # no temporary folder left
    os.remove(os.path.join(disk, "filler"))
    monkeypatch.undo()
    history = train.main(["--out_dir", out, "--resume"])
    assert history["start_step"] == first and checkpoint.read_state(checkpoint.latest_checkpoint(out))["step"] == last


def test_sigterm_writes_a_checkpoint(run, corpus, cache_dir, tmp_path):
    out = tmp_path / "out"
    proc = start(["-u", "train.py", *run_flags(corpus, out, "--max_tokens", "1B", "--log_every", "1",
                                               "--ckpt_every", "0", "--eval_every", "0")],
                 subprocess_env(cache_dir))
    watchdog = threading.Timer(240, proc.kill)  # never hang the suite
    watchdog.start()
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 3 |"):
            break
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(proc, timeout=120)
    watchdog.cancel()
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    params, state = checkpoint.load_checkpoint(str(out))
    assert state["step"] >= 3 and state["tokens_seen"] > 0
    assert all(np.isfinite(x).all() for m in params.values() for x in m.values())


def test_eval_windows_beyond_the_val_split_are_cut_to_it_with_a_warning(corpus, capsys):
    args = train_flags.build_parser("").parse_args(run_flags(corpus, "unused", "--eval_windows", "1000000000"))
    windows = train.eval_windows(args, common.sha256_file(corpus["tokenizer"]), rows_per_micro=8)
    count = data.load_meta(corpus["data"])["splits"]["val"]["tokens"] - SEQ_LEN + 1  # every distinct window
    assert windows.shape == (-(-count // 8) * 8, SEQ_LEN) and not windows[count:].any() and windows[:count].all()
    assert capsys.readouterr().err.splitlines() == [
        f"warning: --eval_windows 1000000000 is more than the {count} windows of {SEQ_LEN} tokens that "
        f"{corpus['data']}/val.bin holds; evaluating on those {count}"]


# ------------------------------------------------------------------------------------------------------------------
# Several processes (--coordinator): two on localhost with one CPU device each, joined by jax's default CPU
# collectives (gloo over TCP), against one process with two devices.

# 12 steps of 16 windows (2 devices x 2 microbatches of 4), a checkpoint every 4 steps, an evaluation at the end
MULTI_FLAGS = ["--batch_size_start", "16", "--micro_batch_size", "4", "--max_tokens", str(12 * STEP_TOKENS),
               "--ckpt_every", str(4 * STEP_TOKENS), "--eval_every", "0", "--log_every", "1"]
HISTORY = ("import json, sys, train; h = train.main(sys.argv[1:]); "
           "print(json.dumps(dict(loss=h['loss'], eval=h['eval'], num_devices=h['num_devices'])))")


def start_two(flags: list[str], out_dirs: list, cache_dir: str, script=("-c", HISTORY)) -> list[subprocess.Popen]:
    """Processes 0 and 1 of one run, each with its --out_dir. Both compile afresh: only process 0 writes the
    persistent cache and on CPU process 1's keys differ, so a cached process 0 would wait at the first collective
    for process 1 to compile, and gloo gives up after 30 s."""
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(subprocess_env(cache_dir), JAX_ENABLE_COMPILATION_CACHE="false")
    return [start([*script, *flags, "--out_dir", str(out), "--coordinator", coordinator, "--num_processes", "2",
                   "--process_id", str(i)], env) for i, out in enumerate(out_dirs)]


def assert_same_arrays(ckpt_a: str, ckpt_b: str) -> None:
    a, b = checkpoint.read_arrays(ckpt_a), checkpoint.read_arrays(ckpt_b)
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{ckpt_b} {key}")


def test_two_processes_stop_together_and_resume_exactly_as_one_process_with_two_devices(corpus, cache_dir, tmp_path):
    """Two processes, SIGTERM to process 0 at once: both stop at the step of their next agreement and process 0
    checkpoints (process 1 writes nothing); both resume from that in one shared --out_dir. Per-step losses,
    evaluation, parameters and optimiser state equal the uninterrupted run of one process with two devices,
    bit for bit: the same program on the same two shards of every batch; only the all-reduce crosses processes,
    and a sum of two operands is exact in either order."""
    one = start(["-c", HISTORY, *run_flags(corpus, tmp_path / "one", *MULTI_FLAGS)],
                subprocess_env(cache_dir, devices=2))
    out, out_p1 = tmp_path / "two", tmp_path / "two_p1"
    procs = start_two(run_flags(corpus, "", *MULTI_FLAGS), [out, out_p1], cache_dir, script=["-u", "train.py"])
    watchdog = threading.Timer(240, lambda: [p.kill() for p in procs])  # never hang the suite
    watchdog.start()
    for line in procs[0].stdout:  # the start line: signals are handled now, and the first step compiles
        if line.startswith("model "):
            break
    procs[0].send_signal(signal.SIGTERM)
    (rc0, _, err0), (rc1, out1, err1) = (finish(p, timeout=240) for p in procs)
    watchdog.cancel()
    assert rc0 == rc1 == 128 + signal.SIGTERM, err0[-3000:] + err1[-3000:]  # process 1 stopped too
    assert "Traceback" not in err0 + err1 and "step" not in out1  # process 1 does not log
    assert not os.path.exists(out_p1)  # nor write
    stopped = checkpoint.read_state(checkpoint.latest_checkpoint(str(out)))["step"]
    assert stopped == train.StopRequest.every and f"stopped by SIGTERM at step {stopped};" in err0

    outputs = [finish(p, timeout=240) for p in [one, *start_two(["--resume"], [out, out], cache_dir)]]
    assert all(rc == 0 for rc, _, _ in outputs), "".join(err[-3000:] for _, _, err in outputs)
    ref, p0, p1 = (json.loads(stdout.strip().splitlines()[-1]) for _, stdout, _ in outputs)
    assert ref["num_devices"] == p0["num_devices"] == p1["num_devices"] == 2 and len(ref["loss"]) == 12
    assert p0["loss"] == p1["loss"] == ref["loss"][stopped:] and p0["eval"] == p1["eval"] == ref["eval"]
    assert list(plot_log.read_log(str(out))[plot_log.TAGS["loss"]].values()) == ref["loss"]  # float32, exact
    names = sorted(n for n in os.listdir(out) if n.startswith("ckpt_"))
    assert names == ["ckpt_00000008", "ckpt_00000010", "ckpt_00000012"]
    for name in ("ckpt_00000008", "ckpt_00000012"):  # before and after the stop
        assert_same_arrays(str(tmp_path / "one" / name), str(out / name))


# ------------------------------------------------------------------------------------------------------------------
# Bad input through the CLI entry (common.run_main(main)): one line on stderr, exit code 2, no traceback.
# In-process, except where the case needs two devices, plus one case as a real `python train.py` subprocess.

BAD_INPUTS = {  # name: (extra flags with {corpus} fields, expected message, devices, in a subprocess)
    "other_tokenizer": (["--tokenizer", "{other_tokenizer}"], "different tokenizer", 1, True),
    "missing_data": (["--data_dir", "{root}/no_such_folder"], "data folder not found", 1, False),
    "heads_do_not_divide_hidden": (["--hidden_size", "100", "--num_heads", "3"], "does not divide", 1, False),
    "micro_batch_does_not_divide_batch": (["--micro_batch_size", "6"], "--micro_batch_size 6", 1, False),
    "batch_does_not_divide_devices": (["--batch_size", "15", "--batch_size_start", "15", "--micro_batch_size", "1"],
                                      "among 2 devices", 2, True),
    "seq_len_above_max_position": (["--seq_len", "600"], "max_position", 1, False),
    "max_tokens_too_small": (["--max_tokens", "100"], "less than one batch", 1, False),
    "seq_len_start_not_a_power_of_2_below": (["--seq_len_start", "12"], "times a power of 2", 1, False),
    "resume_without_checkpoint": (["--resume"], "no complete checkpoint", 1, False),
    "negative_max_minutes": (["--max_minutes", "-1"], "--max_minutes must be a number >= 0", 1, False),
    "max_minutes_too_short": (["--max_minutes", "1e-6"], "leaves no time for one batch", 1, False),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2(case, corpus, background, tmp_path, capsys):
    extra, expected, devices, in_subprocess = BAD_INPUTS[case]
    if in_subprocess:
        rc, _, err = finish(background[case])
    else:
        with pytest.raises(SystemExit) as e:
            common.run_main(lambda: train.main(run_flags(corpus, tmp_path, *[x.format(**corpus) for x in extra])))
        rc, err = e.value.code, capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: ") and expected in lines[0] and "Traceback" not in err
