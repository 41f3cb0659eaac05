import dataclasses
import functools
import json
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import finetune as ft  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
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
# Metrics, against values computed by hand

def test_accuracy_and_f1():
    pred, label = np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])
    assert ft.accuracy(pred, label) == 0.5
    assert ft.f1(pred, label) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    assert ft.f1(np.zeros(3), np.zeros(3)) == 0.0
    assert ft.f1(np.array([0, 0]), np.array([1, 1])) == 0.0


def test_matthews_corr():
    pred, label = np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 1, 0])  # tp 2, fp 1, fn 1, tn 1
    assert ft.matthews_corr(pred, label) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    assert ft.matthews_corr(label, label) == pytest.approx(1.0)
    assert ft.matthews_corr(1 - label, label) == pytest.approx(-1.0)
    assert ft.matthews_corr(np.ones(5), label) == 0.0  # an empty margin


def test_pearson_and_spearman_with_ties():
    assert ft.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / np.sqrt(2 * 14 / 3))
    assert ft.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    np.testing.assert_allclose(ft.average_ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert ft.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / np.sqrt(10))
    assert ft.spearman([1, 5, 9, 20], [0, 1, 4, 100]) == pytest.approx(1.0)  # monotone, not linear


def test_task_metrics_and_glue_score():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    assert ft.task_metrics(ft.TASKS["mrpc"], logits, np.array([0, 1, 0])) == {"f1": pytest.approx(2 / 3),
                                                                               "acc": pytest.approx(2 / 3)}
    assert list(ft.task_metrics(ft.TASKS["mnli"], np.eye(3), np.arange(3), "_mm")) == ["acc_mm"]
    # BERT-large's GLUE leaderboard row has score 80.5 (MNLI counts once, as the mean of m and mm)
    medians = {"cola": {"mcc": .605}, "sst2": {"acc": .949}, "mrpc": {"f1": .893, "acc": .854},
               "stsb": {"pearson": .876, "spearman": .865}, "qqp": {"f1": .721, "acc": .893},
               "mnli": {"acc_m": .867, "acc_mm": .859}, "qnli": {"acc": .927}, "rte": {"acc": .701},
               "wnli": {"acc": .651}}
    assert round(100 * ft.glue_score(medians), 1) == 80.5
    table = ft.glue_table(medians)
    assert "89.3/85.4" in table and "86.7" in table and "80.5" in table
    assert "-" in ft.glue_table({"sst2": {"acc": 0.9}}).splitlines()[1]


# ----------------------------------------------------------------------------------------------------------
# Reading the GLUE TSV files, quirks included

def test_cola_headerless_train_dev_and_missing_final_newline(tmp_path):
    write(tmp_path / "CoLA/train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tJohn bought a dog.\n")
    write(tmp_path / "CoLA/dev.tsv", "w_80\t1\t\tJohn arranged it.\nw_80\t0\t*\tJohn talked to Bill about himself.")
    write(tmp_path / "CoLA/test.tsv", "index\tsentence\n0\tBill whistled.\n1\tThe car honked.\n")
    train_set, dev, test = ft.load_task(ft.TASKS["cola"], str(tmp_path))
    assert train_set.text_a == ["The sailors rode the breeze.", "John bought a dog."]
    assert train_set.labels.tolist() == [1, 0] and train_set.text_b is None
    assert dev[""].text_a[-1] == "John talked to Bill about himself."  # the last line, without its newline
    assert dev[""].labels.tolist() == [1, 0]
    assert test["CoLA.tsv"].text_a == ["Bill whistled.", "The car honked."] and test["CoLA.tsv"].index == ["0", "1"]


def test_holdout_scores_a_task_without_dev_on_fixed_held_out_training_rows(tmp_path):
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(50)))
    with pytest.raises(UserError, match="missing GLUE file .*dev.tsv"):
        ft.load_task(ft.TASKS["sst2"], str(tmp_path), require_test=False)
    train_set, dev, _ = ft.load_task(ft.TASKS["sst2"], str(tmp_path), require_test=False, holdout=0.2)
    again, dev_again, _ = ft.load_task(ft.TASKS["sst2"], str(tmp_path), require_test=False, holdout=0.2)
    assert len(train_set) == 40 and len(dev[""]) == 10 and dev[""].text_a == dev_again[""].text_a
    assert not set(train_set.text_a) & set(dev[""].text_a) and again.text_a == train_set.text_a
    assert sorted(train_set.text_a + dev[""].text_a) == sorted(f"film {i}" for i in range(50))
    assert all(int(t.split()[1]) % 2 == y for t, y in zip(dev[""].text_a, dev[""].labels))  # labels follow rows
    assert "held-out 0.2" in dev[""].source


def test_mrpc_bom_and_columns(tmp_path):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    row = "1\t702876\t702977\tAmrozi called \"the witness\", of it.\tReferring to him as \"the witness\".\n"
    write(tmp_path / "MRPC/train.tsv", header + row + row.replace("1\t", "0\t", 1), bom=True)
    write(tmp_path / "MRPC/dev.tsv", header + row, bom=True)
    write(tmp_path / "MRPC/test.tsv", "index\t#1 ID\t#2 ID\t#1 String\t#2 String\n0\t1\t2\tA b.\tC d.\n")
    train_set, dev, test = ft.load_task(ft.TASKS["mrpc"], str(tmp_path))
    assert train_set.labels.tolist() == [1, 0]
    assert train_set.text_a[0] == "Amrozi called \"the witness\", of it."
    assert train_set.text_b[0] == "Referring to him as \"the witness\"."
    assert dev[""].labels.tolist() == [1] and test["MRPC.tsv"].text_b == ["C d."]


def test_qnli_quotes_are_text(tmp_path):
    header = "index\tquestion\tsentence\tlabel\n"
    write(tmp_path / "QNLI/train.tsv",
          header + "0\tWhat \"is\tit\tentailment\n1\tWhy?\t\" Luis Alvarez, \"x\tnot_entailment\n")
    write(tmp_path / "QNLI/dev.tsv", header + "0\t\"Open quote\tSentence \"\" here\tentailment\n")
    write(tmp_path / "QNLI/test.tsv", "index\tquestion\tsentence\n0\tQ \"\tS\n")
    train_set, dev, test = ft.load_task(ft.TASKS["qnli"], str(tmp_path))
    assert train_set.text_a == ["What \"is", "Why?"] and train_set.text_b[1] == "\" Luis Alvarez, \"x"
    assert train_set.labels.tolist() == [0, 1]
    assert dev[""].text_a == ["\"Open quote"] and dev[""].text_b == ["Sentence \"\" here"]
    assert test["QNLI.tsv"].text_a == ["Q \""]


def test_stsb_scores(tmp_path):
    row = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is \"taking off.\tAn air plane.\t{}\n"
    write(tmp_path / "STS-B/train.tsv", STS_HEADER + "\tscore\n" + row.format("5.000") + row.format("3.800"))
    write(tmp_path / "STS-B/dev.tsv", STS_HEADER + "\tscore\n" + row.format("0.000"))
    write(tmp_path / "STS-B/test.tsv", STS_HEADER + "\n" + row.replace("\t{}", ""))
    train_set, dev, test = ft.load_task(ft.TASKS["stsb"], str(tmp_path))
    np.testing.assert_allclose(train_set.labels, [5.0, 3.8])
    assert train_set.text_a[0] == "A plane is \"taking off." and dev[""].labels.tolist() == [0.0]
    assert len(test["STS-B.tsv"]) == 1


MNLI_TRAIN = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\t"
              "sentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label")


def write_mnli(d, with_ax=True):
    parse = "( ( a ) )\t( b )\t(ROOT a)\t(ROOT b)"
    write(f"{d}/MNLI/train.tsv", MNLI_TRAIN + "\n"
          + f"0\t1\t1e\tgov\t{parse}\tPremise one.\tHyp one.\tneutral\tneutral\n"
          + f"1\t2\t2e\tgov\t{parse}\tPremise two.\tHyp two.\tentailment\tentailment\n")
    dev_header = MNLI_TRAIN.replace("label1", "label1\tlabel2\tlabel3\tlabel4\tlabel5")
    for name, label in (("dev_matched", "contradiction"), ("dev_mismatched", "entailment")):
        write(f"{d}/MNLI/{name}.tsv", dev_header + "\n" +
              f"0\t1\t1c\tfic\t{parse}\tP {name}.\tH.\t{label}\t{label}\t{label}\t{label}\t{label}\t{label}\n")
    test_header = MNLI_TRAIN.rsplit("\tlabel1", 1)[0]
    for name in ("test_matched", "test_mismatched"):
        write(f"{d}/MNLI/{name}.tsv", test_header + "\n" + f"0\t1\t1c\tfic\t{parse}\tP {name}.\tH.\n")
    if with_ax:
        write(f"{d}/diagnostic/diagnostic.tsv", "index\tsentence1\tsentence2\n0\tThe cat sat.\tThe cat did not sit.\n")


def test_mnli_matched_mismatched_and_ax(tmp_path, capsys):
    write_mnli(tmp_path)
    train_set, dev, test = ft.load_task(ft.TASKS["mnli"], str(tmp_path))
    assert train_set.labels.tolist() == [1, 0] and train_set.text_a == ["Premise one.", "Premise two."]
    assert {s: e.labels.tolist() for s, e in dev.items()} == {"_m": [2], "_mm": [0]}
    assert dev["_mm"].text_a == ["P dev_mismatched."]
    assert set(test) == {"MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"}
    assert test["MNLI-mm.tsv"].text_a == ["P test_mismatched."] and test["AX.tsv"].text_b == ["The cat did not sit."]
    os.remove(tmp_path / "diagnostic/diagnostic.tsv")
    _, _, test = ft.load_task(ft.TASKS["mnli"], str(tmp_path))
    assert set(test) == {"MNLI-m.tsv", "MNLI-mm.tsv"} and "AX.tsv" in capsys.readouterr().out


def test_bad_rows_labels_and_missing_files(tmp_path):
    write_sst2(tmp_path, 20, 10)
    with open(tmp_path / "SST-2/train.tsv", "a") as f:
        f.write("one\ttoo\tmany\n")
    with pytest.raises(UserError, match=r"SST-2/train.tsv:22: expected 2 tab-separated fields, found 3"):
        ft.load_task(ft.TASKS["sst2"], str(tmp_path))
    train_set, _, _ = ft.load_task(ft.TASKS["sst2"], str(tmp_path), skip_bad_rows=True)
    assert len(train_set) == 20 and train_set.skipped == 1
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\ngood film\t2\n")
    with pytest.raises(UserError, match=r"dev.tsv:2: label '2' is not one of SST-2's labels"):
        ft.load_task(ft.TASKS["sst2"], str(tmp_path), skip_bad_rows=True)
    with pytest.raises(UserError, match="missing GLUE file .*RTE/train.tsv"):
        ft.load_task(ft.TASKS["rte"], str(tmp_path))
    write(tmp_path / "STS-B/train.tsv", STS_HEADER + "\tscore\n0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n")
    with pytest.raises(UserError, match="not a number in"):
        ft.read_glue_file(ft.TASKS["stsb"], str(tmp_path / "STS-B/train.tsv"), True)


# ----------------------------------------------------------------------------------------------------------
# Tokenising, bucketing, prediction order, submission files

def test_pair_encoding_with_types_and_truncation(tok_path):
    tok = ft.prepare_tokenizer(load_tokenizer(tok_path), 12)
    ex = ft.Examples(["good river city", "the " * 30], ["bad school", "of " * 30], None, ["0", "1"])
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
    enc = ft.encode(ft.prepare_tokenizer(old, 64), ft.Examples(texts, None, None, ["0", "1"]), 64)
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


def test_submission_files(tmp_path):
    path = str(tmp_path / "RTE.tsv")
    outputs = np.array([[0.1, 0.9], [2.0, -1.0]])
    ft.write_submission(path, ["0", "1"], ft.prediction_strings(ft.TASKS["rte"], outputs))
    assert open(path).read() == "index\tprediction\n0\tnot_entailment\n1\tentailment\n"
    assert ft.prediction_strings(ft.TASKS["mnli"], np.eye(3)) == ["entailment", "neutral", "contradiction"]
    assert ft.prediction_strings(ft.TASKS["cola"], outputs) == ["1", "0"]
    assert ft.prediction_strings(ft.TASKS["stsb"], np.array([[3.14159], [0.5]])) == ["3.142", "0.500"]
    assert {s.submission for t in ft.TASKS.values() for s in t.test} == {
        "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv",
        "RTE.tsv", "WNLI.tsv", "AX.tsv"}


def test_schedule_warmup_then_linear_decay():
    s = functools.partial(ft.lr_at, lr=1e-3, total_steps=100, warmup_steps=10)
    assert s(0) == 0 and s(5) == pytest.approx(5e-4) and s(10) == pytest.approx(1e-3)
    assert s(55) == pytest.approx(5e-4) and s(100) == 0 and s(120) == 0
    assert ft.lr_at(0, 1e-3, 100, 0) == pytest.approx(1e-3)  # no warmup: decay from the first step


def test_default_lr_is_higher_for_narrow_models():
    sst2, cola = ft.TASKS["sst2"], ft.TASKS["cola"]
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
    folder = train.save_checkpoint(str(out_dir), state, train.flatten(params, "params"),
                                   open(tok_path, "rb").read(), keep=1)
    if not with_tokenizer:
        os.remove(os.path.join(folder, "tokenizer.json"))
    return folder, params


def test_init_defaults_to_train_py_default_out_dir(tmp_path, tok_path, monkeypatch):
    vocab = load_tokenizer(tok_path).get_vocab_size()
    folder, _ = save_ckpt(tmp_path / "out", tok_path, vocab)
    monkeypatch.chdir(tmp_path)
    init = ft.load_init(ft.parse_args(["--task", "rte"]))
    assert init.cfg.vocab_size == vocab and init.pretrained is not None


def test_init_from_checkpoint_keeps_encoder_and_adds_head(tmp_path, tok_path):
    vocab = load_tokenizer(tok_path).get_vocab_size()
    folder, ckpt_params = save_ckpt(tmp_path / "run", tok_path, vocab)
    args = ft.parse_args(["--task", "rte", "--init", str(tmp_path / "run")])
    init = ft.load_init(args)
    assert init.cfg.hidden_size == 32 and init.info["checkpoint"] == os.path.abspath(folder)
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
    results = ft.main(["--task", "all", "--glue_dir", str(d), "--from_scratch", "--tokenizer", tok_path,
                       "--model", "tiny", "--lr", "1e-3", "--epochs", "3", "--seeds", "2", "--out_dir", out])
    model.set_precision("fp32")
    return results, out, test_rows


def test_classification_learns_and_submission_is_right(glue_run):
    results, out, test_rows = glue_run
    assert set(results) == {"sst2", "stsb"}  # RTE lacks dev data
    sst2 = json.load(open(os.path.join(out, "SST-2.json")))
    assert sst2["median"]["acc"] >= 0.95
    assert len(sst2["seeds"]) == 2 and [len(s["epochs"]) for s in sst2["seeds"]] == [3, 3]
    assert sst2["median"]["acc"] == np.median([s["best"]["acc"] for s in sst2["seeds"]])
    lines = open(os.path.join(out, "submission", "SST-2.tsv")).read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + len(test_rows)
    rows = [line.split("\t") for line in lines[1:]]
    assert [i for i, _ in rows] == [str(100 + k) for k in range(len(test_rows))]
    correct = np.mean([p == str(y) for (_, p), (_, y) in zip(rows, test_rows)])
    assert correct >= 0.95  # predictions map back to the test file's row order


def test_regression_learns_and_glue_table(glue_run):
    results, out, _ = glue_run
    stsb = json.load(open(os.path.join(out, "STS-B.json")))
    assert stsb["median"]["pearson"] > 0.9 and stsb["median"]["spearman"] > 0.9
    lines = open(os.path.join(out, "submission", "STS-B.tsv")).read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 33
    float(lines[1].split("\t")[1])
    glue = json.load(open(os.path.join(out, "glue.json")))
    assert glue["tasks"] == ["sst2", "stsb"]
    assert glue["score"] == pytest.approx(np.mean([ft.task_score(results[k]["median"]) for k in ("sst2", "stsb")]))
    assert os.listdir(os.path.join(out, "tb"))


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
    return {name: (rc, err, cases[name][1]) for name, (rc, err) in results.items()}


@pytest.mark.parametrize("case", ["unknown task", "missing split", "malformed row", "bad label", "no tokenizer",
                                  "vocab mismatch", "no init", "scratch needs model", "no hub"])
def test_cli_bad_input(cli_errors, case):
    rc, err, expected = cli_errors[case]
    assert rc == 2, err
    assert "Traceback" not in err and expected in err
    if case != "unknown task":  # argparse prints its usage first
        assert len(err.strip().splitlines()) == 1, err


def test_hub_source_maps_columns_labels_and_test_ids(monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence1": datasets.Value("string"), "sentence2": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                                  "idx": datasets.Value("int32")})
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        label = -1 if split == "test" else 1
        return datasets.Dataset.from_dict({"sentence1": ["A.", "B."], "sentence2": ["C.", "D."],
                                           "label": [label, label], "idx": [5, 6]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    monkeypatch.setattr(ft.common, "check_hub_reachable", lambda: None)
    train_set, dev, test = ft.load_task(ft.TASKS["rte"], None)
    assert calls == [("nyu-mll/glue", "rte", "train"), ("nyu-mll/glue", "rte", "validation"),
                     ("nyu-mll/glue", "rte", "test")]
    assert train_set.text_b == ["C.", "D."] and train_set.labels.tolist() == [1, 1]
    assert test["RTE.tsv"].labels is None and test["RTE.tsv"].index == ["5", "6"]
    with pytest.raises(UserError, match="label names"):
        ft.read_hub_split(ft.TASKS["mrpc"], ft.TASKS["mrpc"].train)  # the RTE names do not fit MRPC


def test_fp16_step_skips_overflow_and_lowers_the_scale():
    import jmp

    cfg = model.make_config("tiny", 60, num_layers=1, hidden_size=32, num_heads=2, intermediate_size=64,
                            max_position=16)
    model.set_precision("fp16")
    try:
        net = model.classifier_model(cfg, 2)
        opt = ft.make_optimizer(0.01)
        step = ft.make_train_step(net, opt, regression=False)
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
