"""glue.py: the official metrics against values computed by hand, the TSV readers with each task's quirks, the
Hub reader, the GLUE table and the submission files."""
import os

import numpy as np
import pytest

import glue
from common import UserError

STS_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"


def write(path, text: str, bom: bool = False) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# Metrics, against values computed by hand

def test_accuracy_and_f1():
    pred, label = np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])
    assert glue.accuracy(pred, label) == 0.5
    assert glue.f1(pred, label) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    assert glue.f1(np.zeros(3), np.zeros(3)) == 0.0
    assert glue.f1(np.array([0, 0]), np.array([1, 1])) == 0.0


def test_matthews_corr():
    pred, label = np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 1, 0])  # tp 2, fp 1, fn 1, tn 1
    assert glue.matthews_corr(pred, label) == pytest.approx((2 * 1 - 1 * 1) / np.sqrt(3 * 3 * 2 * 2))
    assert glue.matthews_corr(label, label) == pytest.approx(1.0)
    assert glue.matthews_corr(1 - label, label) == pytest.approx(-1.0)
    assert glue.matthews_corr(np.ones(5), label) == 0.0  # an empty margin


def test_pearson_and_spearman_with_ties():
    assert glue.pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / np.sqrt(2 * 14 / 3))
    assert glue.pearson([1, 1, 1], [1, 2, 3]) == 0.0
    np.testing.assert_allclose(glue.average_ranks(np.array([10, 20, 20, 5])), [2, 3.5, 3.5, 1])
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: r = 4.5 / sqrt(4.5 * 5)
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / np.sqrt(10))
    assert glue.spearman([1, 5, 9, 20], [0, 1, 4, 100]) == pytest.approx(1.0)  # monotone, not linear


def test_task_metrics_and_glue_score():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [0.0, 1.0]])
    assert glue.task_metrics(glue.TASKS["mrpc"], logits, np.array([0, 1, 0])) == {"f1": pytest.approx(2 / 3),
                                                                               "acc": pytest.approx(2 / 3)}
    assert list(glue.task_metrics(glue.TASKS["mnli"], np.eye(3), np.arange(3), "_mm")) == ["acc_mm"]
    # STS-B is scored on the clipped scores that a submission holds: these are exactly the labels
    stsb = glue.task_metrics(glue.TASKS["stsb"], np.array([[-1.0], [0.5], [9.0]]), np.array([0.0, 0.5, 5.0]))
    assert stsb == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    # BERT-large's GLUE leaderboard row has score 80.5 (MNLI counts once, as the mean of m and mm)
    medians = {"cola": {"mcc": .605}, "sst2": {"acc": .949}, "mrpc": {"f1": .893, "acc": .854},
               "stsb": {"pearson": .876, "spearman": .865}, "qqp": {"f1": .721, "acc": .893},
               "mnli": {"acc_m": .867, "acc_mm": .859}, "qnli": {"acc": .927}, "rte": {"acc": .701},
               "wnli": {"acc": .651}}
    assert round(100 * glue.glue_score(medians), 1) == 80.5
    table = glue.glue_table(medians)
    assert "89.3/85.4" in table and "86.7" in table and "80.5" in table
    assert "-" in glue.glue_table({"sst2": {"acc": 0.9}}).splitlines()[1]


# ----------------------------------------------------------------------------------------------------------
# Reading the GLUE TSV files, quirks included

def test_cola_headerless_train_dev_and_missing_final_newline(tmp_path):
    write(tmp_path / "CoLA/train.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tJohn bought a dog.\n")
    write(tmp_path / "CoLA/dev.tsv", "w_80\t1\t\tJohn arranged it.\nw_80\t0\t*\tJohn talked to Bill about himself.")
    write(tmp_path / "CoLA/test.tsv", "index\tsentence\n0\tBill whistled.\n1\tThe car honked.\n")
    train_set, dev, test = glue.load_task(glue.TASKS["cola"], str(tmp_path))
    assert train_set.text_a == ["The sailors rode the breeze.", "John bought a dog."]
    assert train_set.labels.tolist() == [1, 0] and train_set.text_b is None
    assert dev[""].text_a[-1] == "John talked to Bill about himself."  # the last line, without its newline
    assert dev[""].labels.tolist() == [1, 0]
    assert test["CoLA.tsv"].text_a == ["Bill whistled.", "The car honked."] and test["CoLA.tsv"].index == ["0", "1"]


def test_holdout_scores_a_task_without_dev_on_fixed_held_out_training_rows(tmp_path):
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(50)))
    with pytest.raises(UserError, match="missing GLUE file .*dev.tsv"):
        glue.load_task(glue.TASKS["sst2"], str(tmp_path), require_test=False)
    train_set, dev, _ = glue.load_task(glue.TASKS["sst2"], str(tmp_path), require_test=False, holdout=0.2)
    again, dev_again, _ = glue.load_task(glue.TASKS["sst2"], str(tmp_path), require_test=False, holdout=0.2)
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
    train_set, dev, test = glue.load_task(glue.TASKS["mrpc"], str(tmp_path))
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
    train_set, dev, test = glue.load_task(glue.TASKS["qnli"], str(tmp_path))
    assert train_set.text_a == ["What \"is", "Why?"] and train_set.text_b[1] == "\" Luis Alvarez, \"x"
    assert train_set.labels.tolist() == [0, 1]
    assert dev[""].text_a == ["\"Open quote"] and dev[""].text_b == ["Sentence \"\" here"]
    assert test["QNLI.tsv"].text_a == ["Q \""]


def test_stsb_scores(tmp_path):
    row = "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is \"taking off.\tAn air plane.\t{}\n"
    write(tmp_path / "STS-B/train.tsv", STS_HEADER + "\tscore\n" + row.format("5.000") + row.format("3.800"))
    write(tmp_path / "STS-B/dev.tsv", STS_HEADER + "\tscore\n" + row.format("0.000"))
    write(tmp_path / "STS-B/test.tsv", STS_HEADER + "\n" + row.replace("\t{}", ""))
    train_set, dev, test = glue.load_task(glue.TASKS["stsb"], str(tmp_path))
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
    train_set, dev, test = glue.load_task(glue.TASKS["mnli"], str(tmp_path))
    assert train_set.labels.tolist() == [1, 0] and train_set.text_a == ["Premise one.", "Premise two."]
    assert {s: e.labels.tolist() for s, e in dev.items()} == {"_m": [2], "_mm": [0]}
    assert dev["_mm"].text_a == ["P dev_mismatched."]
    assert set(test) == {"MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"}
    assert test["MNLI-mm.tsv"].text_a == ["P test_mismatched."] and test["AX.tsv"].text_b == ["The cat did not sit."]
    os.remove(tmp_path / "diagnostic/diagnostic.tsv")
    _, _, test = glue.load_task(glue.TASKS["mnli"], str(tmp_path))
    assert set(test) == {"MNLI-m.tsv", "MNLI-mm.tsv"} and "AX.tsv" in capsys.readouterr().out


def test_bad_rows_labels_and_missing_files(tmp_path):
    write(tmp_path / "SST-2/train.tsv", "sentence\tlabel\n" + "".join(f"film {i}\t{i % 2}\n" for i in range(20)))
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\nfine film\t1\n")
    write(tmp_path / "SST-2/test.tsv", "index\tsentence\n0\tfine film\n")
    with open(tmp_path / "SST-2/train.tsv", "a") as f:
        f.write("one\ttoo\tmany\n")
    with pytest.raises(UserError, match=r"SST-2/train.tsv:22: expected 2 tab-separated fields, found 3"):
        glue.load_task(glue.TASKS["sst2"], str(tmp_path))
    train_set, _, _ = glue.load_task(glue.TASKS["sst2"], str(tmp_path), skip_bad_rows=True)
    assert len(train_set) == 20 and train_set.skipped == 1
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\n" + "no label\n" * 3)
    with pytest.raises(UserError, match=r"dev.tsv has no data rows \(3 skipped as malformed\)"):
        glue.load_task(glue.TASKS["sst2"], str(tmp_path), skip_bad_rows=True)
    write(tmp_path / "SST-2/dev.tsv", "sentence\tlabel\ngood film\t2\n")
    with pytest.raises(UserError, match=r"dev.tsv:2: label '2' is not one of SST-2's labels"):
        glue.load_task(glue.TASKS["sst2"], str(tmp_path), skip_bad_rows=True)
    with pytest.raises(UserError, match="missing GLUE file .*RTE/train.tsv"):
        glue.load_task(glue.TASKS["rte"], str(tmp_path))
    write(tmp_path / "STS-B/train.tsv", STS_HEADER + "\tscore\n0\tg\tf\ty\t0\tn\tn\ta\tb\t7.5\n")
    with pytest.raises(UserError, match="not a number in"):
        glue.read_glue_file(glue.TASKS["stsb"], str(tmp_path / "STS-B/train.tsv"), True)


def test_submission_and_dev_prediction_files(tmp_path):
    outputs = np.array([[0.1, 0.9], [2.0, -1.0]])
    assert glue.write_submissions(glue.TASKS["rte"], {"RTE.tsv": outputs}, {"RTE.tsv": ["7", "9"]},
                                  str(tmp_path / "sub")) == [str(tmp_path / "sub" / "RTE.tsv")]
    assert open(tmp_path / "sub" / "RTE.tsv").read() == "index\tprediction\n7\tnot_entailment\n9\tentailment\n"
    assert glue.write_submissions(glue.TASKS["rte"], {}, {}, str(tmp_path / "none")) == []
    assert not os.path.exists(tmp_path / "none")  # no test set, no submission folder
    strings = lambda task, out: glue.label_strings(glue.TASKS[task], glue.predictions(glue.TASKS[task], out))  # noqa
    assert strings("mnli", np.eye(3)) == ["entailment", "neutral", "contradiction"]
    assert strings("cola", outputs) == ["1", "0"]
    # STS-B scores outside [0, 5] are clipped, as the test server expects
    assert strings("stsb", np.array([[3.14159], [0.5], [-0.4], [5.7]])) == ["3.142", "0.500", "0.000", "5.000"]
    path = str(tmp_path / "STS-B.dev.tsv")
    glue.write_predictions(path, glue.TASKS["stsb"], ["0", "1"], np.array([[5.7], [2.0]]), np.array([4.8, 1.25]))
    assert open(path).read() == "index\tprediction\tlabel\n0\t5.000\t4.800\n1\t2.000\t1.250\n"
    assert set(os.listdir(tmp_path)) == {"sub", "STS-B.dev.tsv"}  # no temporary left behind
    assert {s.submission for t in glue.TASKS.values() for s in t.test} == {
        "CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv", "QNLI.tsv",
        "RTE.tsv", "WNLI.tsv", "AX.tsv"}


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
    monkeypatch.setattr(glue.corpus, "check_hub_reachable", lambda: None)
    train_set, dev, test = glue.load_task(glue.TASKS["rte"], None)
    assert calls == [("nyu-mll/glue", "rte", "train"), ("nyu-mll/glue", "rte", "validation"),
                     ("nyu-mll/glue", "rte", "test")]
    assert train_set.text_b == ["C.", "D."] and train_set.labels.tolist() == [1, 1]
    assert test["RTE.tsv"].labels is None and test["RTE.tsv"].index == ["5", "6"]
    with pytest.raises(UserError, match="label names"):
        glue.read_hub_split(glue.TASKS["mrpc"], glue.TASKS["mrpc"].train)  # the RTE names do not fit MRPC
