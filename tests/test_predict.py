"""predict.py and the model folder finetune.py saves: end to end, a tiny SST-2-like task finetuned on 200 rows for
one epoch, saved, then predict.py on its 50 dev rows (from the file and from stdin) must give the predictions
finetune.py wrote to SST-2.dev.tsv. Mean pooling, pairs and regression: tests/test_finetune.py's GLUE run."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import checkpoint  # noqa: E402
import finetune as ft  # noqa: E402
import model  # noqa: E402
import predict  # noqa: E402
from test_finetune import sst_rows, write, write_sst2  # noqa: E402
from tokenizer import train_tokenizer  # noqa: E402

ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("predict")
    write_sst2(str(d / "glue"), 200, 50)
    (d / "tok.json").write_text(train_tokenizer([s for s, _ in sst_rows(300, 9)], vocab_size=150).to_str())
    ft.main(["--task", "sst2", "--glue_dir", str(d / "glue"), "--from_scratch", "--tokenizer", str(d / "tok.json"),
             "--model", "tiny", "--lr", "1e-3", "--epochs", "1", "--batch_size", "8", "--out_dir", str(d / "out")])
    model.set_precision("fp32")
    dev = [line.split("\t") for line in (d / "out" / "SST-2.dev.tsv").read_text().splitlines()[1:]]
    return d, str(d / "out" / "SST-2.model"), [p for _, p, _ in dev]


def as_glue_labels(lines: list[str]) -> list[str]:
    """predict.py's label names (negative, positive) as SST-2's files spell them (0, 1)."""
    return [str(["negative", "positive"].index(line.split("\t")[0])) for line in lines]


def test_model_folder_holds_what_predict_needs(run):
    d, folder, _ = run
    assert sorted(os.listdir(folder)) == sorted(checkpoint.MODEL_FILES) and checkpoint.manifest_damage(folder) is None
    info = json.loads(open(os.path.join(folder, "model.json")).read())
    results = json.loads((d / "out" / "SST-2.json").read_text())
    assert (info["task"], info["labels"], info["pooling"], info["max_len"]) == ("SST-2", ["negative", "positive"],
                                                                                 "cls", 128)
    assert info["seed"] == results["submission_seed"] and info["dev"] == results["median"]
    assert results["model_folder"] == folder
    spec = json.loads(open(os.path.join(folder, "tokenizer.json")).read())
    assert spec["truncation"] is None and spec["padding"] is None  # as tokenizer.py writes them
    loaded = checkpoint.load_model_folder(folder)
    assert loaded.num_labels == 2 and loaded.cfg.num_layers == 2 and set(loaded.params) >= {"classifier"}


def test_predict_file_and_stdin_equal_the_dev_predictions(run):
    d, folder, dev_predictions = run
    assert len(set(dev_predictions)) == 2  # the model learned something: not one label for every row
    from_file = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--model", folder, "--input",
                                str(d / "glue" / "SST-2" / "dev.tsv")], capture_output=True, text=True, env=ENV)
    assert from_file.returncode == 0, from_file.stderr
    lines = from_file.stdout.splitlines()
    assert len(lines) == 50 and as_glue_labels(lines) == dev_predictions
    assert all(0.5 <= float(line.split("\t")[1]) <= 1 for line in lines)
    sentences = [s + " " for s, _ in sst_rows(50, 1)]  # as write_sst2 wrote them
    from_stdin = subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), "--model", folder],
                                input="\n".join(sentences) + "\n", capture_output=True, text=True, env=ENV)
    assert from_stdin.returncode == 0 and from_stdin.stdout == from_file.stdout, from_stdin.stderr
    assert "warning" not in from_stdin.stderr


def test_jsonl_in_and_out(run, tmp_path):
    d, folder, dev_predictions = run
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps({"id": i, "review": s + " "}) + "\n" for i, (s, _) in enumerate(sst_rows(50, 1))))
    out = str(tmp_path / "pred.jsonl")
    predict.main(["--model", folder, "--input", str(path), "--columns", "review", "--format", "jsonl", "--out", out])
    rows = [json.loads(line) for line in open(out)]
    assert as_glue_labels([r["label"] for r in rows]) == dev_predictions
    for r in rows:
        assert r["probability"] == max(r["probabilities"].values())
        assert sum(r["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)


def test_long_input_is_cut_with_one_warning(run, tmp_path, capsys):
    _, folder, _ = run
    path = write(str(tmp_path / "long.tsv"), "sentence\n" + "good film\n" + "the river " * 40 + "\n"
                 + "bad " * 50 + "\n")
    lines = predict.main(["--model", folder, "--input", path, "--max_len", "16"])
    err = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and len(err) == 1
    assert err[0] == "warning: 2 of 3 examples are longer than --max_len 16 tokens and were cut (the first: data row 2)"
    # Cutting is what finetune.py's encode does: the cut row predicts as its first 16 tokens.
    assert predict.main(["--model", folder, "--input", path])[0] == lines[0]

