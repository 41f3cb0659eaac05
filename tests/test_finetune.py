import dataclasses
import functools
import json
import os
import random
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import finetune as ft  # noqa: E402
import glue  # noqa: E402
import model  # noqa: E402
import checkpoint  # noqa: E402
from common import CLS_ID, SEP_ID, UserError, load_tokenizer  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

FILL = "the of and to in was is for on that with as by at from river city school music player team season".split()


def write(path, text: str, bom: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# Synthetic tasks: the label is a keyword (classification) or a count of "alpha" among 5 words (regression)

def sst_rows(n, seed):
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        label = r.randint(0, 1)
        words = r.choices(FILL, k=r.randint(3, 9))
        words.insert(r.randint(0, len(words)), "good" if label else "bad")
        rows.append((" ".join(words), label))
    return rows


def sts_rows(n, seed):
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        k = r.randint(0, 5)
        words = ["alpha"] * k + r.choices(FILL, k=5 - k)
        r.shuffle(words)
        rows.append((" ".join(words), " ".join(r.choices(FILL, k=r.randint(2, 6))), float(k)))
    return rows


STS_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"


def write_sst2(d, n_train=512, n_dev=128, test=None):
    write(f"{d}/SST-2/train.tsv", "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in sst_rows(n_train, 0)))
    write(f"{d}/SST-2/dev.tsv", "sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in sst_rows(n_dev, 1)))
    test = sst_rows(64, 2) if test is None else test
    # Test ids deliberately not 0..n-1, to see that the submission keeps the file's ids.
    write(f"{d}/SST-2/test.tsv", "index\tsentence\n" + "".join(f"{100 + i}\t{s}\n" for i, (s, _) in enumerate(test)))
    return test


def write_stsb(d):
    for split, n, seed in (("train", 800, 3), ("dev", 128, 4)):
        write(f"{d}/STS-B/{split}.tsv", STS_HEADER + "\tscore\n" + "".join(
            f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\t{s:.3f}\n"
            for i, (a, b, s) in enumerate(sts_rows(n, seed))))
    write(f"{d}/STS-B/test.tsv", STS_HEADER + "\n" + "".join(
        f"{i}\tmain-captions\tMSRvid\t2012test\t{i:04d}\tnone\tnone\t{a}\t{b}\n"
        for i, (a, b, _) in enumerate(sts_rows(32, 5))))


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    docs = [s for s, _ in sst_rows(300, 9)] + [f"{a} {b}" for a, b, _ in sts_rows(300, 9)]
    docs += ["Amrozi accused his brother, whom he called \"the witness\".", "What came into force after 1987?"]
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    path.write_text(train_tokenizer(docs, vocab_size=150).to_str())
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# Tokenising, bucketing, prediction order

def test_pair_encoding_with_types_and_truncation(tok_path):
    tok = ft.prepare_tokenizer(load_tokenizer(tok_path), 12)
    ex = glue.Examples(["good river city", "the " * 30], ["bad school", "of " * 30], None, ["0", "1"])
    enc = ft.encode(tok, ex, 12)
    n = enc.lengths[0]
    assert enc.ids[0, 0] == CLS_ID and enc.ids[0, n - 1] == SEP_ID and n == 8  # [CLS] 3 [SEP] 2 [SEP]
    assert enc.types[0, :n].tolist() == [0] * 5 + [1] * 3 and not enc.ids[0, n:].any()
    b = int(enc.types[1].sum()) - 1  # sentence B's tokens ([SEP] excluded); A has 12 - 3 - b
    assert enc.lengths[1] == 12 and abs((9 - b) - b) <= 1  # longest-first: both cut to about half


def test_tokenizer_file_with_padding_on_is_not_padded(tok_path):
    old = load_tokenizer(tok_path)  # tokenizer.py's files had padding switched on before
    old.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = ["good", "the river city school of music"]
    enc = ft.encode(ft.prepare_tokenizer(old, 64), glue.Examples(texts, None, None, ["0", "1"]), 64)
    assert enc.lengths.tolist() == [len(load_tokenizer(tok_path).encode(t).ids) for t in texts]


def test_bucketing_covers_every_row_once():
    lengths = np.random.default_rng(0).integers(3, 128, size=1000)
    for rng in (None, np.random.default_rng(1)):
        batches = ft.make_batches(lengths, 32, rng)
        assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
        assert sorted(len(b) for b in batches) == [1000 - 31 * 32] + [32] * 31
    batches = ft.make_batches(lengths, 32, np.random.default_rng(1))
    padded = sum(32 * ft.padded_length(lengths[b].max(), 16, 128) for b in batches)
    assert lengths.sum() / padded > 0.8  # sorting within chunks leaves little padding (random batches: ~0.5)
    assert {ft.padded_length(n, 16, 128) for n in range(1, 200)} == set(range(16, 129, 16))
    assert {ft.padded_length(n, 8, 512) for n in range(1, 600)} == {*range(8, 65, 8), *range(80, 129, 16),
                                                                    *range(160, 257, 32), *range(320, 513, 64)}
    assert all(ft.padded_length(n, 8, 512) >= n for n in range(1, 513))


def test_collate_pads_with_mask_and_filler_rows():
    enc = ft.Encoded(np.array([[2, 7, 3, 0], [2, 8, 9, 3]], np.int32), np.array([[0, 0, 0, 0], [0, 0, 1, 1]], np.int8),
                     np.array([3, 4], np.int32))
    b = ft.collate(enc, np.array([1, 0]), 4, 2, np.array([0, 1], np.int32))
    assert b.tokens.shape == (4, 4) and b.tokens[0].tolist() == [2, 8, 9, 3] and b.tokens[1].tolist() == [2, 7, 3, 0]
    assert b.mask[1].tolist() == [True, True, True, False] and b.types[0].tolist() == [0, 0, 1, 1]
    assert b.weights.tolist() == [1, 1, 0, 0] and b.labels[:2].tolist() == [1, 0]
    assert b.tokens[2].tolist() == [CLS_ID, SEP_ID, 0, 0] and b.mask[2].tolist() == [True, True, False, False]


def test_predict_keeps_row_order():
    rng = np.random.default_rng(0)
    n, max_len = 203, 40
    lengths = rng.integers(2, max_len + 1, size=n).astype(np.int32)
    ids = np.where(np.arange(max_len)[None] < lengths[:, None], rng.integers(5, 99, size=(n, max_len)), 0)
    enc = ft.Encoded(ids.astype(np.int32), np.zeros((n, max_len), np.int8), lengths)
    fn = jax.jit(lambda p, tokens, types, mask: jnp.stack([jnp.sum(tokens * mask, -1), jnp.sum(mask, -1)], -1)
                 .astype(jnp.float32) + p)
    out = ft.predict(fn, 0.0, enc, 16, 8)
    np.testing.assert_array_equal(out, np.stack([ids.sum(-1), lengths], -1))


def test_schedule_warmup_then_linear_decay():
    s = functools.partial(ft.finetune_lr, lr=1e-3, total_steps=100, warmup_steps=10)
    assert s(0) == 0 and s(5) == pytest.approx(5e-4) and s(10) == pytest.approx(1e-3)
    assert s(55) == pytest.approx(5e-4) and s(100) == 0 and s(120) == 0
    assert ft.finetune_lr(0, 1e-3, 100, 0) == pytest.approx(1e-3)  # no warmup: decay from the first step


def test_default_lr_is_higher_for_narrow_models():
    sst2, cola = glue.TASKS["sst2"], glue.TASKS["cola"]
    for preset in ("tiny", "mini"):
        cfg = model.make_config(preset, 100)
        assert ft.default_lr(sst2, cfg) == ft.default_lr(cola, cfg) == 2e-4
    for preset in ("small", "base"):
        cfg = model.make_config(preset, 100)
        assert (ft.default_lr(sst2, cfg), ft.default_lr(cola, cfg)) == (3e-5, 5e-5)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: the encoder comes from the checkpoint, the head is new

def save_ckpt(out_dir, tok_path, vocab_size, with_tokenizer=True):
    cfg = model.make_config("tiny", vocab_size, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                            max_position=64)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.mlm_model(cfg).init)(jax.random.PRNGKey(7), tokens, jnp.zeros((1, 1), jnp.int32))
    state = {"step": 5, "tokens_seen": 640, "config": dataclasses.asdict(cfg), "precision": "fp32"}
    folder = checkpoint.save_checkpoint(str(out_dir), state, checkpoint.flatten(params, "params"),
                                   open(tok_path, "rb").read(), keep=1)
    if not with_tokenizer:  # as a checkpoint from before the manifest, which did not list its files
        os.remove(os.path.join(folder, "tokenizer.json"))
        os.remove(os.path.join(folder, checkpoint.MANIFEST))
    return folder, params


def test_init_defaults_to_train_py_default_out_dir(tmp_path, tok_path, monkeypatch):
    vocab = load_tokenizer(tok_path).get_vocab_size()
    folder, _ = save_ckpt(tmp_path / "out", tok_path, vocab)
    monkeypatch.chdir(tmp_path)
    init = ft.load_init()
    assert init.cfg.vocab_size == vocab and init.pretrained is not None


def test_init_from_checkpoint_keeps_encoder_and_adds_head(tmp_path, tok_path):
    vocab = load_tokenizer(tok_path).get_vocab_size()
    folder, ckpt_params = save_ckpt(tmp_path / "run", tok_path, vocab)
    init = ft.load_init(init=str(tmp_path / "run"))
    assert init.cfg.hidden_size == 32 and init.info["checkpoint"] == os.path.join(str(tmp_path / "run"), os.path.basename(folder))  # as given
    params, fresh = ft.init_params(init.cfg, 2, init.pretrained, jax.random.PRNGKey(0))
    assert sorted(fresh) == ["bert/pooler/dense/b", "bert/pooler/dense/w", "classifier/b", "classifier/w"]
    for module, leaves in params.items():
        for name, value in leaves.items():
            if f"{module}/{name}" not in fresh:
                np.testing.assert_array_equal(value, ckpt_params[module][name])
    del init.pretrained["bert/layer_0/mlp/output"]
    with pytest.raises(UserError, match="lacks encoder parameter bert/layer_0/mlp/output"):
        ft.init_params(init.cfg, 2, init.pretrained, jax.random.PRNGKey(0))


# ----------------------------------------------------------------------------------------------------------
# End to end (in process): --task all learns a synthetic classification and a regression task

@pytest.fixture(scope="module")
def glue_run(tmp_path_factory, tok_path):
    d = tmp_path_factory.mktemp("glue")
    test_rows = write_sst2(d)
    write_stsb(d)
    write(f"{d}/RTE/train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")  # no dev: skipped
    out = str(d / "out")
    shutil.copy(tok_path, d / "tok.json")
    results = ft.main(["--task", "all", "--glue_dir", str(d), "--from_scratch", "--tokenizer", tok_path,
                       "--model", "tiny", "--lr", "1e-3", "--epochs", "3", "--seeds", "2", "--pooling", "mean",
                       "--out_dir", out])
    model.set_precision("fp32")
    return results, out, test_rows


def test_classification_learns_and_submission_is_right(glue_run):
    results, out, test_rows = glue_run
    assert set(results) == {"sst2", "stsb"}  # RTE lacks dev data
    sst2 = json.load(open(os.path.join(out, "SST-2.json")))
    assert sst2["median"]["acc"] >= 0.95 and sst2["config"]["pooling"] == "mean"
    assert len(sst2["seeds"]) == 2 and [len(s["epochs"]) for s in sst2["seeds"]] == [3, 3]
    assert sst2["median"]["acc"] == np.median([s["best"]["acc"] for s in sst2["seeds"]])
    lines = open(os.path.join(out, "submission", "SST-2.tsv")).read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + len(test_rows)
    rows = [line.split("\t") for line in lines[1:]]
    assert [i for i, _ in rows] == [str(100 + k) for k in range(len(test_rows))]
    correct = np.mean([p == str(y) for (_, p), (_, y) in zip(rows, test_rows)])
    assert correct >= 0.95  # predictions map back to the test file's row order
    # Dev predictions of the submission's seed (the median), at its best epoch, with the dev file's labels
    lines = open(os.path.join(out, "SST-2.dev.tsv")).read().splitlines()
    assert lines[0] == "index\tprediction\tlabel" and sst2["dev_prediction_files"] == [f"{out}/SST-2.dev.tsv"]
    rows = [line.split("\t") for line in lines[1:]]
    assert [(i, y) for i, _, y in rows] == [(str(k), str(y)) for k, (_, y) in enumerate(sst_rows(128, 1))]
    seed = next(s for s in sst2["seeds"] if s["seed"] == sst2["submission_seed"])
    assert np.mean([p == y for _, p, y in rows]) == pytest.approx(seed["best"]["acc"])


def test_regression_learns_and_glue_table(glue_run):
    results, out, _ = glue_run
    stsb = json.load(open(os.path.join(out, "STS-B.json")))
    assert stsb["median"]["pearson"] > 0.9 and stsb["median"]["spearman"] > 0.9
    lines = open(os.path.join(out, "submission", "STS-B.tsv")).read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 33
    assert all(0 <= float(line.split("\t")[1]) <= 5 for line in lines[1:])
    dev = [line.split("\t") for line in open(os.path.join(out, "STS-B.dev.tsv")).read().splitlines()[1:]]
    assert len(dev) == 128 and all(0 <= float(p) <= 5 for _, p, _ in dev)
    seed = next(s for s in stsb["seeds"] if s["seed"] == stsb["submission_seed"])
    pred, label = np.array([[float(p), float(y)] for _, p, y in dev]).T
    assert label.tolist() == [y for _, _, y in sts_rows(128, 4)]
    assert glue.pearson(pred, label) == pytest.approx(seed["best"]["pearson"], abs=0.01)  # 3 decimals written
    table = json.load(open(os.path.join(out, "glue.json")))
    assert table["tasks"] == ["sst2", "stsb"]
    assert table["score"] == pytest.approx(np.mean([glue.task_score(results[k]["median"]) for k in ("sst2", "stsb")]))
    assert os.listdir(os.path.join(out, "tb"))


def test_saved_models_predict_what_the_dev_files_say(glue_run):
    """Mean pooling, a regression task and sentence pairs through predict.py: its outputs on each dev file are
    the ones finetune.py wrote there (the model folders hold the median seed's best epoch, pooling included)."""
    import predict

    _, out, _ = glue_run
    d = os.path.dirname(out)
    for task, labels in (("SST-2", ["negative", "positive"]), ("STS-B", None)):
        info = json.load(open(os.path.join(out, f"{task}.model", "model.json")))
        assert info["pooling"] == "mean" and info["labels"] == labels
        lines = predict.main(["--model", os.path.join(out, f"{task}.model"), "--input", f"{d}/{task}/dev.tsv"])
        dev = [line.split("\t")[1] for line in open(os.path.join(out, f"{task}.dev.tsv")).read().splitlines()[1:]]
        got = [line.split("\t")[0] for line in lines]
        assert (got if labels is None else [str(labels.index(x)) for x in got]) == dev
    model.set_precision("fp32")


def test_an_earlier_run_s_outputs_are_refused_before_training(glue_run, capsys):
    _, out, _ = glue_run
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    d = os.path.dirname(out)
    with pytest.raises(UserError, match=f"{out}/SST-2.json already exists \\(and .* more output\\(s\\) of an "
                                        "earlier run\\); pass --overwrite"):
        ft.main(["--task", "all", "--glue_dir", d, "--from_scratch", "--tokenizer", os.path.join(d, "tok.json"),
                 "--model", "tiny", "--out_dir", out, "--no_save"])
    assert "epoch" not in capsys.readouterr().out  # nothing trained
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}


def test_lr_grid_picks_the_best_median_on_dev_and_every_output_follows_it(tmp_path, tok_path):
    write_sst2(tmp_path, 128, 32)
    out = tmp_path / "out"
    write(str(out / "SST-2.json"), "{}")  # an earlier run's outputs, replaced with --overwrite
    write(str(out / "tb" / "SST-2" / "seed0" / "events.old"), "")
    result = ft.main(["--task", "sst2", "--glue_dir", str(tmp_path), "--from_scratch", "--tokenizer", tok_path,
                      "--model", "tiny", "--lr", "1e-5,1e-3", "--seeds", "2", "--epochs", "1", "--out_dir", str(out),
                      "--overwrite"])["sst2"]
    saved = json.load(open(out / "SST-2.json"))
    assert saved == json.loads(json.dumps(result))
    grid = saved["lr_grid"]
    assert [r["lr"] for r in grid["rates"]] == [1e-5, 1e-3] and grid["chosen_on"].startswith("dev")
    assert all(len(r["seeds"]) == 2 and r["median_score"] == np.median([s["best_score"] for s in r["seeds"]])
               for r in grid["rates"])
    win = max(grid["rates"], key=lambda r: r["median_score"])
    assert grid["lr"] == saved["config"]["lr"] == win["lr"] and saved["median"] == win["median"]
    assert saved["seeds"] == win["seeds"] and saved["submission_seed"] == win["median_seed"]
    info = json.load(open(out / "SST-2.model" / "model.json"))
    assert (info["lr"], info["seed"]) == (win["lr"], win["median_seed"])
    seed = next(s for s in win["seeds"] if s["seed"] == win["median_seed"])
    rows = [line.split("\t") for line in open(out / "SST-2.dev.tsv").read().splitlines()[1:]]
    assert np.mean([p == y for _, p, y in rows]) == pytest.approx(seed["best"]["acc"]) == info["dev"]["acc"]
    assert sorted(os.listdir(out / "tb" / "SST-2")) == ["lr0.001", "lr1e-05"]  # the old logs went first


# ----------------------------------------------------------------------------------------------------------
# Bad input from the command line: exit 2, one line on stderr, no traceback. Launched all at once.

@pytest.fixture(scope="module")
def cli_errors(tmp_path_factory, tok_path):
    d = tmp_path_factory.mktemp("bad")
    write_sst2(d / "ok", 20, 10)
    write_sst2(d / "rows", 20, 10)
    with open(d / "rows/SST-2/dev.tsv", "a") as f:
        f.write("no label column\n")
    write_sst2(d / "labels", 20, 10)
    write(d / "labels/SST-2/train.tsv", "sentence\tlabel\nfine film\tpositive\n")
    write(d / "nodev/SST-2/train.tsv", "sentence\tlabel\nfine film\t1\n")
    write_sst2(d / "allbad", 20, 10)
    write(d / "allbad/SST-2/dev.tsv", "sentence\tlabel\n" + "no label\n" * 3)
    vocab = load_tokenizer(tok_path).get_vocab_size()
    save_ckpt(d / "notok", tok_path, vocab, with_tokenizer=False)
    other_tok = d / "other.json"
    other_tok.write_text(train_tokenizer([s for s, _ in sst_rows(50, 3)], vocab_size=60).to_str())
    save_ckpt(d / "ckpt", tok_path, vocab)
    scratch = ["--from_scratch", "--tokenizer", tok_path, "--model", "tiny"]
    cases = {
        "unknown task": (["--task", "squad", "--glue_dir", str(d / "ok")] + scratch, "invalid choice"),
        "missing split": (["--task", "sst2", "--glue_dir", str(d / "nodev")] + scratch, "missing GLUE file"),
        "malformed row": (["--task", "sst2", "--glue_dir", str(d / "rows")] + scratch, "dev.tsv:12: expected 2"),
        "every row bad": (["--task", "sst2", "--glue_dir", str(d / "allbad"), "--skip_bad_rows"] + scratch,
                          "dev.tsv has no data rows (3 skipped as malformed)"),
        "bad label": (["--task", "sst2", "--glue_dir", str(d / "labels")] + scratch, "label 'positive' is not one"),
        "no tokenizer": (["--task", "sst2", "--glue_dir", str(d / "ok"), "--init", str(d / "notok")],
                         "has no tokenizer.json"),
        "vocab mismatch": (["--task", "sst2", "--glue_dir", str(d / "ok"), "--init", str(d / "ckpt"), "--tokenizer",
                            str(other_tok)], "tokens but checkpoint"),
        "no init": (["--task", "sst2", "--glue_dir", str(d / "ok")], "no out/ here"),
        "scratch needs model": (["--task", "sst2", "--glue_dir", str(d / "ok"), "--from_scratch", "--tokenizer",
                                 tok_path], "--from_scratch needs"),
        "no hub": (["--task", "wnli"] + scratch, "--glue_dir"),
    }
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0"}
    procs = {name: subprocess.Popen([sys.executable, os.path.join(ROOT, "finetune.py"), *argv,
                                     "--out_dir", str(d / "results")],  # no d/out: --init's default
                                    cwd=str(d), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, (argv, _) in cases.items()}
    results = {name: (p.wait(timeout=120), p.stderr.read()) for name, p in procs.items()}
    for p in procs.values():
        p.stdout.close()
        p.stderr.close()
    return {name: (rc, err, cases[name][1]) for name, (rc, err) in results.items()}, d / "results"


@pytest.mark.parametrize("case", ["unknown task", "missing split", "malformed row", "every row bad", "bad label",
                                  "no tokenizer", "vocab mismatch", "no init", "scratch needs model", "no hub"])
def test_cli_bad_input(cli_errors, case):
    rc, err, expected = cli_errors[0][case]
    assert rc == 2, err
    assert "Traceback" not in err and expected in err
    assert len(err.strip().splitlines()) == 1, err


def test_failed_runs_leave_no_submission_folder(cli_errors):
    out_dir = cli_errors[1]  # made before the data is read, which failed in several cases
    assert os.path.isdir(out_dir) and not os.path.exists(out_dir / "submission")


def test_a_diverged_run_writes_no_result(tmp_path, tok_path):
    """A finite but absurd --lr makes the loss NaN: one error line, and no results JSON, dev TSV or submission."""
    write_sst2(tmp_path, 64, 16)
    out = tmp_path / "out"
    with pytest.raises(UserError, match="SST-2 seed 0 epoch 1: train loss and dev outputs not finite, so no result"):
        ft.main(["--task", "sst2", "--glue_dir", str(tmp_path), "--from_scratch", "--tokenizer", tok_path, "--model",
                 "tiny", "--lr", "1e30", "--warmup", "0", "--epochs", "1", "--pooling", "mean",  # glue_run's compiled step
                 "--out_dir", str(out)])
    assert not [name for name in os.listdir(out) if name != "tb"]


def test_fp16_step_skips_overflow_and_lowers_the_scale():
    import jmp

    cfg = model.make_config("tiny", 60, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                            max_position=16)
    model.set_precision("fp16")
    try:
        net = model.classifier_model(cfg, 2)
        opt = model.make_optimizer(weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)
        step = ft.make_finetune_step(net, opt, regression=False)
        params, _ = ft.init_params(cfg, 2, None, jax.random.PRNGKey(0))
        before = jax.tree.map(np.array, params)
        tokens = np.full((4, 8), 7, np.int32)
        batch = (tokens, np.zeros_like(tokens), np.ones((4, 8), bool), np.array([0, 1, 0, 1], np.int32),
                 np.ones(4, np.float32), jax.random.PRNGKey(1), 0, np.float32(1e-3))
        huge = jmp.DynamicLossScale(jnp.float32(2.0 ** 100))  # the scaled gradients overflow
        params, opt_state, scale, loss = step(params, opt.init(params), huge, *batch)
        assert float(scale.loss_scale) < 2.0 ** 100 and np.isfinite(float(loss))
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), before)
        params, opt_state, scale, _ = step(params, opt_state, jmp.DynamicLossScale(jnp.float32(2.0 ** 8)), *batch)
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(before)))
    finally:
        model.set_precision("fp32")
