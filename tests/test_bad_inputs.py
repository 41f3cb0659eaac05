"""Every script's user mistakes, through the real command line: exit code 2, one stderr line starting "error:",
no traceback. The subprocesses start together (most of their time is importing jax) and are collected per case."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import model  # noqa: E402
from conftest import damage_checkpoint  # noqa: E402

HF_FIXTURE = os.path.join(ROOT, "tests", "data", "hf_tiny_bert")
COORDINATOR = ["--coordinator", "localhost:12345"]
SST2 = ["--task", "sst2", "--glue_dir", "{root}/glue"]

# name: (script, arguments ({root}: the fixtures' folder, {hf}: the Hugging Face fixture), what the line must say,
# and what it must not say (a misleading hint), if anything). Scripts run in {root}: train.py's defaults data/ and
# tokenizer.json are the good ones there.
CASES = {
    "vocab_size_too_large": ("tokenizer.py", ["--vocab_size", "1000000000000"], "--vocab_size must be in", None),
    "vocab_size_beyond_64_bits": ("tokenizer.py", ["--vocab_size", str(2**64)], "--vocab_size must be in", None),
    "min_frequency_negative": ("tokenizer.py", ["--min_frequency", "-1"], "--min_frequency must be in", None),
    "limit_alphabet_negative": ("tokenizer.py", ["--limit_alphabet", "-2"], "--limit_alphabet must be in", None),
    "tokenizer_out_exists": ("tokenizer.py", ["--out", "{root}/a_file"], "--overwrite", None),
    "tokenizer_config_exists": ("tokenizer.py", ["--out", "{root}/tok_dir/tokenizer.json"],
                                "tokenizer_config.json already exists", None),
    "data_unreadable_meta": ("data.py", ["--out", "{root}/data_bad_meta"], "cannot read", "complete data"),
    "batch_mb_zero": ("data.py", ["--out", "{root}/new_data", "--batch_mb", "0"], "--batch_mb", None),
    "out_dir_is_a_file": ("train.py", ["--out_dir", "{root}/a_file"], "is a file", None),
    "process_id_out_of_range": ("train.py", [*COORDINATOR, "--num_processes", "2", "--process_id", "5"],
                                "--process_id 5", None),
    "micro_batch_size_zero": ("train.py", ["--micro_batch_size", "0"], "--micro_batch_size must be >= 1", None),
    "data_dir_is_a_file": ("train.py", ["--data_dir", "{root}/a_file"], "is a file", "--out"),
    "meta_vocab_size_not_a_number": ("train.py", ["--data_dir", "{root}/data_vocab_big"], "'big'", None),
    "meta_vocab_size_not_the_tokenizer_s": ("train.py", ["--data_dir", "{root}/data_vocab_100"], "vocab_size 100",
                                            None),
    "meta_token_count_not_a_number": ("train.py", ["--data_dir", "{root}/data_tokens_many"], "'manymany'",
                                      "manymanymany"),
    "plot_out_is_a_file": ("plot_log.py", ["{root}/run", "--out", "{root}/a_file"], "is a file", None),
    "hf_tokenizer_out_exists": ("hf.py", ["--tokenizer", "{hf}", "{root}/a_file"], "--overwrite", None),
    "export_out_exists": ("hf.py", ["--export", "{root}/run", "{root}/tok_dir"], "--overwrite", None),
    "init_truncated_checkpoint": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000001"],
                                  "damaged checkpoint", None),
    "init_checkpoint_with_empty_state": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000002"],
                                         "damaged checkpoint", None),
    "export_bitflipped_checkpoint": ("hf.py", ["--export", "{root}/ckpts/ckpt_00000003", "{root}/new_export"],
                                     "damaged checkpoint", None),
    "export_overwrite_of_another_folder": ("hf.py", ["--export", "{root}/run", "{root}/data", "--overwrite"],
                                           "does not write", None),
    "export_mean_pooled_classifier": ("hf.py", ["--export", "{root}/model_mean", "{root}/new_export"],
                                      "--pooling mean", None),
    "finetune_earlier_run_s_outputs": ("finetune.py", [*SST2, "--from_scratch", "--tokenizer", "tokenizer.json",
                                                       "--model", "tiny", "--out_dir", "{root}/ft_out"],
                                       "SST-2.dev.tsv already exists; pass --overwrite", None),
    "eval_only_classifier_of_another_task": ("finetune.py", [*SST2, "--init_hf", "{hf}", "--eval_only"],
                                             "3 label(s) (LABEL_0, LABEL_1, LABEL_2), SST-2 has 2", None),
    "eval_only_without_a_classifier": ("finetune.py", [*SST2, "--init", "{root}/run", "--eval_only"],
                                       "--eval_only scores", None),
    "predict_empty_stdin": ("predict.py", ["--model", "{root}/model"], "stdin is empty", None),
    "predict_damaged_model_folder": ("predict.py", ["--model", "{root}/model_bitflip"],
                                     "damaged model folder", None),
    "predict_model_folder_of_another_shape": ("predict.py", ["--model", "{root}/model_3_labels"],
                                              "its model.json (3 label(s), hidden size 32) implies", None),
    "predict_not_a_model_folder": ("predict.py", ["--model", "{root}/data"], "has no model.json", None),
    "predict_tsv_without_the_column": ("predict.py", ["--model", "{root}/model", "--input", "{root}/reviews.tsv"],
                                       "no column 'sentence' in the header (text, stars); name", None),
    "predict_two_texts_for_a_one_text_model": ("predict.py", ["--model", "{root}/model", "--input",
                                                              "{root}/reviews.tsv", "--columns", "text,stars"],
                                               "takes 1 text(s)", None),
}
# Recoverable: exit 0 and one "warning:" line on stderr.
WARNINGS = {
    "predict_line_longer_than_max_len": ("predict.py", ["--model", "{root}/model", "--input", "{root}/long.tsv",
                                                        "--columns", "text", "--max_len", "8"],
                                         "1 of 2 examples are longer than --max_len 8 tokens and were cut"),
}
CORPUS_FLAGS = {"tokenizer.py": ["--text_files", "corpus.txt"],
                "data.py": ["--text_files", "corpus.txt", "--tokenizer", "tokenizer.json"]}


def edited_copy(src: str, dst: str, edit) -> None:
    shutil.copytree(src, dst)
    meta = json.loads(open(os.path.join(dst, "meta.json")).read())
    edit(meta)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f)


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def model_folders(root: str, tokenizer_path: str) -> None:
    """finetune.py model folders (random params): a good one, a bit-flipped one, one whose model.json says 3 labels
    where its arrays have 2 (manifest rewritten: damage in the making, not on the disk), and a mean-pooled one."""
    tok = common.load_tokenizer(tokenizer_path)
    cfg = model.BertConfig(vocab_size=tok.get_vocab_size(), num_layers=1, hidden_size=32, num_heads=2,
                           intermediate_size=64, max_position=32)
    tokens = np.zeros((1, 2), np.int32)
    params = jax.tree.map(np.asarray, model.classifier_model(cfg, 2).init(jax.random.PRNGKey(0), tokens, tokens,
                                                                          tokens == 0))
    info = {"task": "SST-2", "labels": ["negative", "positive"], "pooling": "cls", "max_len": 32,
            "precision": "fp32", "config": dataclasses.asdict(cfg)}
    tokenizer_bytes = open(tokenizer_path, "rb").read()
    for name, changes in (("model", {}), ("model_bitflip", {}), ("model_3_labels", {}),
                          ("model_mean", {"pooling": "mean"})):
        checkpoint.save_model_folder(os.path.join(root, name), params, {**info, **changes}, tokenizer_bytes)
    damage_checkpoint(os.path.join(root, "model_bitflip"), "bitflip")
    path = os.path.join(root, "model_3_labels", checkpoint.MODEL_JSON)
    edited = json.loads(open(path).read())
    edited["labels"] = ["a", "b", "c"]
    write(path, json.dumps(edited))
    os.remove(os.path.join(root, "model_3_labels", checkpoint.MANIFEST))
    checkpoint.write_manifest(os.path.join(root, "model_3_labels"))


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_docs, tiny_tokenizer_path):
    """{case: (returncode, stderr)}, the subprocesses all started before the first is waited for."""
    root = str(tmp_path_factory.mktemp("bad_inputs"))
    with open(os.path.join(root, "corpus.txt"), "w") as f:
        f.write("\n".join(tiny_docs) + "\n")
    shutil.copy(tiny_tokenizer_path, os.path.join(root, "tokenizer.json"))
    good = os.path.join(root, "data")
    data.prepare(tiny_docs, tiny_tokenizer_path, good, val_docs=20, progress=False)
    edited_copy(good, os.path.join(root, "data_vocab_big"), lambda m: m.update(vocab_size="big"))
    edited_copy(good, os.path.join(root, "data_vocab_100"), lambda m: m.update(vocab_size=100))
    edited_copy(good, os.path.join(root, "data_tokens_many"), lambda m: m["splits"]["train"].update(tokens="manymany"))
    shutil.copytree(good, os.path.join(root, "data_bad_meta"))
    with open(os.path.join(root, "data_bad_meta", "meta.json"), "w") as f:
        f.write("{")
    open(os.path.join(root, "a_file"), "w").close()
    os.makedirs(os.path.join(root, "tok_dir"))
    open(os.path.join(root, "tok_dir", "tokenizer_config.json"), "w").close()

    for step, fault in ((1, "truncate"), (2, "empty_state"), (3, "bitflip")):
        folder = checkpoint.save_checkpoint(os.path.join(root, "ckpts"), dict(step=step, tokens_seen=step),
                                            {"params/a/w": np.ones((64, 64))}, b"tok", keep=3)
        damage_checkpoint(folder, fault)

    model_folders(root, tiny_tokenizer_path)
    sentences = "".join(d + "\n" for d in tiny_docs[:20])
    for split, header in (("train", "sentence\tlabel\n"), ("dev", "sentence\tlabel\n"), ("test", "index\tsentence\n")):
        write(os.path.join(root, "glue", "SST-2", f"{split}.tsv"), header + "".join(
            (f"{i}\t{d}\n" if split == "test" else f"{d}\t{i % 2}\n") for i, d in enumerate(tiny_docs[:20])))
    write(os.path.join(root, "ft_out", "SST-2.dev.tsv"), "index\tprediction\tlabel\n")
    write(os.path.join(root, "reviews.tsv"), "text\tstars\n" + sentences.replace("\n", "\t5\n"))
    write(os.path.join(root, "long.tsv"), "text\nthe river\n" + "the river city school " * 10 + "\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, (script, args, *_) in {**CASES, **WARNINGS}.items():
        argv = [a.format(root=root, hf=HF_FIXTURE) for a in [*CORPUS_FLAGS.get(script, []), *args]]
        procs[name] = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=root, env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
    done = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        done[name] = (proc.returncode, err)
    return done


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_and_exit_2(case, results):
    rc, err = results[case]
    _, _, says, must_not_say = CASES[case]
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert says in lines[0], lines[0]
    assert must_not_say is None or must_not_say not in lines[0], lines[0]


@pytest.mark.parametrize("case", list(WARNINGS))
def test_one_warning_line_and_exit_0(case, results):
    rc, err = results[case]
    lines = err.splitlines()
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("warning: ") and WARNINGS[case][2] in lines[0], err
