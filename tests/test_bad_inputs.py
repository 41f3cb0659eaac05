"""Every script's user mistakes, through the real command line: exit code 2, one stderr line starting "error:",
no traceback. The subprocesses start together (most of their time is importing jax) and are collected per case.
The flags' domains (FLAG_CASES) run in this process through each script's main() and common.run_main, as
`python SCRIPT.py ARGS` would, without an interpreter start for each."""
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import model as bert  # noqa: E402
import train_flags  # noqa: E402
from conftest import damage_checkpoint, fill_disk  # noqa: E402

HF_FIXTURE = os.path.join(ROOT, "tests", "data", "hf_tiny_bert")
COORDINATOR = ["--coordinator", "localhost:12345"]
SST2 = ["--task", "sst2", "--glue_dir", "{root}/glue"]

# name: (script, arguments ({root}: the fixtures' folder, {hf}: the Hugging Face fixture; {ro}: a read-only tmpfs,
# {full_export}, {full_tokenizer}: full ones), what the line must say, and what it must not say (a misleading hint),
# if anything). Scripts run in {root}: train.py's defaults data/ and tokenizer.json are the good ones there.
CASES = {
    "vocab_size_too_large": ("tokenizer.py", ["--vocab_size", "1000000000000"], "--vocab_size must be an integer in",
                             None),
    "vocab_size_beyond_64_bits": ("tokenizer.py", ["--vocab_size", str(2**64)], "--vocab_size must be an integer in",
                                  None),
    "min_frequency_negative": ("tokenizer.py", ["--min_frequency", "-1"], "--min_frequency must be an integer in",
                               None),
    "limit_alphabet_negative": ("tokenizer.py", ["--limit_alphabet", "-2"], "--limit_alphabet must be an integer in",
                                None),
    "tokenizer_out_exists": ("tokenizer.py", ["--out", "{root}/a_file"], "--overwrite", None),
    "tokenizer_config_exists": ("tokenizer.py", ["--out", "{root}/tok_dir/tokenizer.json"],
                                "tokenizer_config.json already exists", None),
    "data_unreadable_meta": ("data.py", ["--out", "{root}/data_bad_meta"], "cannot read", "complete data"),
    "batch_mb_zero": ("data.py", ["--out", "{root}/new_data", "--batch_mb", "0"], "--batch_mb", None),
    "out_dir_is_a_file": ("train.py", ["--out_dir", "{root}/a_file"], "is a file", None),
    "process_id_out_of_range": ("train.py", [*COORDINATOR, "--num_processes", "2", "--process_id", "5"],
                                "--process_id 5", None),
    "micro_batch_size_zero": ("train.py", ["--micro_batch_size", "0"], "--micro_batch_size must be an integer >= 1",
                              None),
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
    # checkpoints damaged where no manifest can tell, or in the manifest itself
    "init_manifest_files_empty_list": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000004"],
                                       "unreadable manifest.json", None),
    "export_manifest_files_null": ("hf.py", ["--export", "{root}/ckpts/ckpt_00000005", "{root}/new_export"],
                                   "unreadable manifest.json", None),
    "init_manifest_entry_a_string": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000006"],
                                     "the record of arrays.npz is", None),
    "init_state_without_step": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000007"],
                                "state.json lacks step", None),
    "export_state_step_abc": ("hf.py", ["--export", "{root}/ckpts/ckpt_00000008", "{root}/new_export"],
                              'step is "abc", not a whole number', None),
    "init_state_a_list": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000009"],
                          "state.json holds list", None),
    "export_state_an_int": ("hf.py", ["--export", "{root}/ckpts/ckpt_00000010", "{root}/new_export"],
                            "state.json holds int", None),
    "init_no_manifest_no_arrays": ("finetune.py", ["--task", "sst2", "--init", "{root}/ckpts/ckpt_00000011"],
                                   "arrays.npz is missing", None),
    "init_foreign_tokenizer": ("finetune.py", ["--task", "sst2", "--init", "{root}/foreign/ckpt_00000001"],
                               "tokenizer.json is not the run's tokenizer", None),
    "export_foreign_tokenizer": ("hf.py", ["--export", "{root}/foreign/ckpt_00000001", "{root}/new_export"],
                                 "tokenizer.json is not the run's tokenizer", None),
    # Hugging Face folders with values of the wrong type
    "hf_tokenizer_epsilon_a_word": ("hf.py", ["--tokenizer", "{root}/hf_eps", "{root}/new_tok.json"],
                                    "layer_norm_eps is 'tiny', not a number", None),
    "init_hf_positions_null": ("finetune.py", ["--task", "sst2", "--init_hf", "{root}/hf_positions"],
                               "max_position_embeddings is None", None),
    "init_hf_added_token_without_content": ("finetune.py", ["--task", "sst2", "--init_hf", "{root}/hf_added"],
                                            "added_tokens entry has no 'content'", None),
    "plot_event_file_a_folder": ("plot_log.py", ["{root}/tb_folder_run", "--out", "{root}/plots"], "is not a file",
                                 None),
    # token ids beyond the vocabulary: found at train.py's start, and by data.py --verify
    "train_ids_beyond_vocabulary": ("train.py", ["--data_dir", "{root}/data_bad_ids"],
                                    "not below the vocabulary size", "--lr"),
    "verify_ids_beyond_vocabulary": ("data.py", ["--verify", "--out", "{root}/data_bad_ids"],
                                     "holds token id 60000 at position 0", None),
    # read-only output folders (a read-only tmpfs mount)
    "train_out_dir_new_read_only": ("train.py", ["--out_dir", "{ro}/new_out"], "read-only file system", None),
    "train_out_dir_existing_read_only": ("train.py", ["--out_dir", "{ro}/out"], "read-only file system", None),
    "train_resume_read_only": ("train.py", ["--out_dir", "{ro}/run", "--resume"], "read-only file system", None),
    "finetune_out_dir_read_only": ("finetune.py", ["--task", "sst2", "--from_scratch", "--tokenizer", "tokenizer.json",
                                                   "--model", "tiny", "--out_dir", "{ro}/glue"],
                                   "read-only file system", None),
    "export_read_only": ("hf.py", ["--export", "{root}/real/ckpt_00000001", "{ro}/export"], "read-only file system",
                         None),
    "plot_out_read_only": ("plot_log.py", ["{root}/tb_run", "--out", "{ro}/plots"], "read-only file system", None),
    "data_out_read_only": ("data.py", ["--out", "{ro}/data"], "read-only file system", None),
    "tokenizer_out_read_only": ("tokenizer.py", ["--out", "{ro}/tokenizer.json"], "read-only file system", None),
    # full disks (a tmpfs filled up): the export and the tokenizer pair leave nothing behind (test below)
    "export_full_disk": ("hf.py", ["--export", "{root}/real/ckpt_00000001", "{full_export}/export"],
                         "No space left on device", None),
    "tokenizer_full_disk": ("tokenizer.py", ["--out", "{full_tokenizer}/tokenizer.json"], "No space left on device",
                            None),
    # argparse's own errors, one line naming the flag (and what is allowed) in every script
    "tokenizer_vocab_size_not_a_number": ("tokenizer.py", ["--vocab_size", "abc"],
                                          "--vocab_size must be an integer in [6, 1048576], got 'abc'", None),
    "train_precision_unknown": ("train.py", ["--precision", "fp8"], "--precision: invalid choice: 'fp8'", None),
    "finetune_task_unknown": ("finetune.py", ["--task", "imdb"], "--task: invalid choice: 'imdb' (choose from",
                              None),
    "hf_needs_a_mode": ("hf.py", [], "one of the arguments --export --tokenizer is required", None),
    "plot_log_needs_out_dir": ("plot_log.py", [], "required: OUT_DIR", None),
    "plateau_probe_windows_zero": ("plateau_probe.py", ["--init", "x", "--data_dir", "x", "--windows", "0"],
                                   "--windows must be an integer >= 1", None),
    "bench_steps_zero": ("bench.py", ["--steps", "0"], "--steps must be an integer >= 1", None),
    # a FIFO would block open() for ever
    "tokenizer_text_file_is_a_fifo": ("tokenizer.py", ["--text_files", "{root}/fifo", "--out", "{root}/new.json"],
                                      "not a regular file", None),
    "data_text_file_is_a_fifo": ("data.py", ["--text_files", "{root}/fifo", "--out", "{root}/new_data"],
                                 "not a regular file", None),
    # jax's own timeout would abort the process with a C++ stack trace after 300 s
    "coordinator_unreachable": ("train.py", ["--coordinator", "127.0.0.1:1", "--num_processes", "2", "--process_id",
                                             "1", "--coordinator_timeout", "2"], "within --coordinator_timeout 2 s",
                                None),
    # finetuned model folders, predict.py, the existing-output rule and --eval_only
    "export_mean_pooled_classifier": ("hf.py", ["--export", "{root}/model_mean", "{root}/new_export"],
                                      "--pooling mean", None),
    "finetune_earlier_run_s_outputs": ("finetune.py", [*SST2, "--from_scratch", "--tokenizer", "tokenizer.json",
                                                       "--model", "tiny", "--out_dir", "{root}/ft_out"],
                                       "SST-2.dev.tsv already exists; pass --overwrite", None),
    "eval_only_classifier_of_another_task": ("finetune.py", [*SST2, "--init_hf", "{hf}", "--eval_only"],
                                             "3 label(s) (LABEL_0, LABEL_1, LABEL_2), SST-2 has 2", None),
    "eval_only_without_a_classifier": ("finetune.py", [*SST2, "--init", "{root}/real", "--eval_only"],
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

# name: (script, arguments, what the line must say). Run in this process: each fails before any computation.
FLAG_CASES = {
    # seeds that jax.random.PRNGKey cannot take or would fold onto smaller ones
    "train_seed_2_63": ("train.py", ["--seed", str(2**63)], "--seed must be an integer in [0, 4294967295]"),
    "finetune_seed_negative": ("finetune.py", ["--task", "sst2", "--seed", "-1"], "--seed must be an integer in [0,"),
    "finetune_seed_2_70": ("finetune.py", ["--task", "sst2", "--seed", str(2**70)], "--seed must be an integer in"),
    "finetune_seeds_past_the_last": ("finetune.py", ["--task", "sst2", "--seed", str(2**32 - 1), "--seeds", "2"],
                                     "runs seeds up to 4294967296"),
    # finite and in each one's domain
    **{f"train_{flag[2:]}_{value}": ("train.py", [f"{flag}={value}"],
                                     f"{flag} must be a number {domain}, got '{value}'")
       for flag, value, domain in [
           ("--lr", "nan", "> 0"), ("--lr", "inf", "> 0"), ("--lr", "0", "> 0"), ("--weight_decay", "nan", ">= 0"),
           ("--b2", "1.0", "in [0, 1)"), ("--b2", "nan", "in [0, 1)"), ("--b1", "-1", "in [0, 1)"),
           ("--b2", "-0.5", "in [0, 1)"), ("--b1", "1.5", "in [0, 1)"), ("--eps", "0", "> 0"),
           ("--eps", "-1e-3", "> 0"), ("--grad_clip", "nan", ">= 0"), ("--peak_flops", "-1", ">= 0"),
           ("--peak_flops", "nan", ">= 0"), ("--loss_scale_init", "-1", "> 0"), ("--loss_scale_init", "nan", "> 0"),
           ("--dropout", "1", "in [0, 1)"), ("--mask_rate", "0", "in (0, 1)"), ("--warmup_frac", "1.5", "in [0, 1]")]},
    **{f"finetune_{flag[2:]}_{value}": ("finetune.py", ["--task", "sst2", f"{flag}={value}"],
                                        f"{flag} must be {domain}")
       for flag, value, domain in [
           ("--lr", "inf", "a number > 0"), ("--weight_decay", "nan", "a number >= 0"),
           ("--weight_decay", "-1", "a number >= 0"), ("--epochs", "0", "an integer >= 1"),
           ("--seeds", "0", "an integer >= 1"), ("--max_len", "7", "an integer >= 8"),
           ("--holdout", "1.5", "a number in [0, 1)"), ("--dropout", "1", "a number in [0, 1)"),
           ("--warmup", "-0.1", "a number in [0, 1)"), ("--batch_size", "0", "an integer >= 1"),
           ("--eval_batch_size", "0", "an integer >= 1"), ("--pad_multiple", "0", "an integer >= 1"),
           ("--log_every", "0", "an integer >= 1"), ("--max_train_examples", "-1", "an integer >= 0")]},
    "finetune_holdout_leaves_no_training_row": (
        "finetune.py", ["--task", "rte", "--glue_dir", "{root}/glue", "--holdout", "0.999", "--from_scratch",
                        "--tokenizer", "tokenizer.json", "--model", "tiny", "--out_dir", "{root}/glue_out"],
        "--holdout 0.999 holds out all 3 rows"),
    "train_negative_value_needs_equals": ("train.py", ["--eps", "-1e-3"], "is written --eps=VALUE"),
    "train_max_tokens_not_a_count": ("train.py", ["--max_tokens", "10x"], "--max_tokens must be a count >= 0 such as"),
    "train_model_unknown": ("train.py", ["--model", "huge"], "--model: invalid choice: 'huge' (choose from 'tiny'"),
    "train_max_tokens_no_machine_finishes": ("train.py", ["--max_tokens", "1e30"], "--max_tokens must be a count in"),
    "train_coordinator_not_host_port": ("train.py", ["--coordinator", "nohost"], "--coordinator must be HOST:PORT"),
    "train_resume_below_tokens_done": ("train.py", ["--out_dir", "{root}/trained", "--resume", "--max_tokens", "4096"],
                                       "has trained on 8192 tokens already"),
    "train_model_beyond_memory": ("train.py", ["--num_layers", "1000000"], "choose a smaller --model"),
    "data_val_fraction_one": ("data.py", ["--val_fraction", "1"], "--val_fraction must be a number in [0, 1)"),
    "data_format_unknown": ("data.py", ["--format", "csv"], "--format: invalid choice: 'csv'"),
    "plot_log_unknown_flag": ("plot_log.py", ["run", "--smooth", "3"], "unrecognized arguments: --smooth 3"),
}
MOUNTED = ("{ro}", "{full_export}", "{full_tokenizer}")  # cases with these run only where a tmpfs can be mounted
AFTER_WORK = {"tokenizer_full_disk"}  # fails at the end of its work, after its progress bar: the last line counts
CORPUS_FLAGS = {"tokenizer.py": ["--text_files", "corpus.txt"],
                "data.py": ["--text_files", "corpus.txt", "--tokenizer", "tokenizer.json"]}


def edited_copy(src: str, dst: str, edit) -> None:
    shutil.copytree(src, dst)
    meta = json.loads(open(os.path.join(dst, "meta.json")).read())
    edit(meta)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f)


def small_checkpoint(out_dir: str, tokenizer_path: str) -> str:
    """A one-layer model's checkpoint, as train.py writes it for finetune.py and hf.py (no optimiser state)."""
    import jax
    import jax.numpy as jnp

    tok_bytes = open(tokenizer_path, "rb").read()
    cfg = bert.make_config("tiny", common.load_tokenizer(tokenizer_path).get_vocab_size(), num_layers=1,
                           hidden_size=32, num_heads=2, intermediate_size=64, max_position=64)
    params = bert.mlm_model(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 1), jnp.int32))
    state = dict(step=1, tokens_seen=4, config=dataclasses.asdict(cfg), precision="fp32",
                 tokenizer_sha256=common.sha256_bytes(tok_bytes))
    return checkpoint.save_checkpoint(out_dir, state, checkpoint.flatten(params, "params"), tok_bytes, keep=1)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def model_folders(root: str, tokenizer_path: str) -> None:
    """finetune.py model folders (random params): a good one, a bit-flipped one, one whose model.json says 3 labels
    where its arrays have 2 (manifest rewritten: damage in the making, not on the disk), and a mean-pooled one."""
    import jax

    tok = common.load_tokenizer(tokenizer_path)
    cfg = bert.BertConfig(vocab_size=tok.get_vocab_size(), num_layers=1, hidden_size=32, num_heads=2,
                          intermediate_size=64, max_position=32)
    tokens = np.zeros((1, 2), np.int32)
    params = jax.tree.map(np.asarray, bert.classifier_model(cfg, 2).init(jax.random.PRNGKey(0), tokens, tokens,
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


def hf_variant(root: str, name: str, config: dict | None = None, tokenizer_json: dict | None = None) -> None:
    shutil.copytree(HF_FIXTURE, os.path.join(root, name))
    if config:
        write_json(os.path.join(root, name, "config.json"),
                   json.load(open(os.path.join(HF_FIXTURE, "config.json"))) | config)
    if tokenizer_json:
        write_json(os.path.join(root, name, "tokenizer.json"), tokenizer_json)


def make_mounts(root: str, mounts, tiny_tokenizer_path: str) -> bool:
    """{root}/ro: a read-only tmpfs holding an existing out_dir, a resumable run and a finetune out_dir;
    {root}/full_*: full ones. False where they cannot be mounted."""
    ro = os.path.join(root, "ro")
    if not mounts.tmpfs(ro, "4m"):
        return False
    os.makedirs(os.path.join(ro, "out", "tb"))
    os.makedirs(os.path.join(ro, "glue"))
    tok = open(tiny_tokenizer_path, "rb").read()
    state = dict(step=1, tokens_seen=1, skipped_steps=0, config={}, precision="fp32", loss_scale=None,
                 tokenizer_sha256=hashlib.sha256(tok).hexdigest(), args={})  # a run with train.py's defaults
    checkpoint.save_checkpoint(os.path.join(ro, "run"), state, {"params/a/w": np.ones(3)}, tok, keep=1)
    mounts.read_only(ro)
    for name, leave in (("full_export", 0), ("full_tokenizer", 4096)):  # the tokenizer's config fits, no more
        if not mounts.tmpfs(os.path.join(root, name), "256k"):
            return False
        fill_disk(os.path.join(root, name), leave)
    return True


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_docs, tiny_tokenizer_path) -> str:
    """The fixtures' folder, with every input the cases name."""
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
    os.mkfifo(os.path.join(root, "fifo"))
    os.makedirs(os.path.join(root, "glue", "RTE"))
    with open(os.path.join(root, "glue", "RTE", "train.tsv"), "w") as f:
        f.write("index\tsentence1\tsentence2\tlabel\n" + "".join(f"{i}\ta\tb\tentailment\n" for i in range(3)))
    with open(os.path.join(root, "glue", "RTE", "test.tsv"), "w") as f:
        f.write("index\tsentence1\tsentence2\n0\ta\tb\n")
    flags = vars(train_flags.build_parser("").parse_args(["--max_tokens", "4096"]))  # a run of train.py's defaults
    cfg = bert.make_config("mini", common.load_tokenizer(tiny_tokenizer_path).get_vocab_size())
    state = checkpoint.run_state(step=2, tokens_seen=8192, skipped_steps=0, cfg=cfg, precision="fp32", loss_scale=None,
                                 seed=0, tokenizer_sha256=common.sha256_file(tiny_tokenizer_path), args=flags,
                                 num_devices=1)
    checkpoint.save_checkpoint(os.path.join(root, "trained"), state, {"params/a/w": np.ones(2)},
                               open(tiny_tokenizer_path, "rb").read(), keep=1)

    faults = ("truncate", "empty_state", "bitflip", "manifest_files_empty_list", "manifest_files_null",
              "manifest_entry_a_string", "state_without_step", "state_step_abc", "state_a_list", "state_an_int",
              "no_manifest_no_arrays")
    for step, fault in enumerate(faults, 1):
        folder = checkpoint.save_checkpoint(os.path.join(root, "ckpts"), dict(step=step, tokens_seen=step),
                                            {"params/a/w": np.ones((64, 64))}, b"tok", keep=len(faults))
        damage_checkpoint(folder, fault)
    small_checkpoint(os.path.join(root, "real"), tiny_tokenizer_path)
    foreign = small_checkpoint(os.path.join(root, "foreign"), tiny_tokenizer_path)
    damage_checkpoint(foreign, "no_manifest")  # then a tokenizer with the same vocabulary, not the run's: cased
    spec = json.load(open(tiny_tokenizer_path))
    spec["normalizer"]["lowercase"] = False
    write_json(os.path.join(foreign, "tokenizer.json"), spec)

    hf_variant(root, "hf_eps", config={"layer_norm_eps": "tiny"})
    hf_variant(root, "hf_positions", config={"max_position_embeddings": None})
    vocab = {line.rstrip("\n"): i for i, line in enumerate(open(os.path.join(HF_FIXTURE, "vocab.txt")))}
    hf_variant(root, "hf_added", tokenizer_json={
        "model": {"type": "WordPiece", "vocab": vocab}, "normalizer": {"type": "BertNormalizer"},
        "pre_tokenizer": {"type": "BertPreTokenizer"}, "added_tokens": [{"id": 0, "special": True}]})
    os.makedirs(os.path.join(root, "tb_folder_run", "tb", "events.out.tfevents.1.host"))
    from tensorboardX import SummaryWriter
    with SummaryWriter(os.path.join(root, "tb_run", "tb")) as writer:
        writer.add_scalar("train/loss", 1.0, 1)
    shutil.copytree(good, os.path.join(root, "data_bad_ids"))
    with open(os.path.join(root, "data_bad_ids", "train.bin"), "r+b") as f:
        f.write(np.array([60000], np.uint16).tobytes())  # the vocabulary has 200 ids (uint16 files)
    model_folders(root, tiny_tokenizer_path)
    sentences = "".join(d + "\n" for d in tiny_docs[:20])
    for split, header in (("train", "sentence\tlabel\n"), ("dev", "sentence\tlabel\n"), ("test", "index\tsentence\n")):
        write(os.path.join(root, "glue", "SST-2", f"{split}.tsv"), header + "".join(
            (f"{i}\t{d}\n" if split == "test" else f"{d}\t{i % 2}\n") for i, d in enumerate(tiny_docs[:20])))
    write(os.path.join(root, "ft_out", "SST-2.dev.tsv"), "index\tprediction\tlabel\n")
    write(os.path.join(root, "reviews.tsv"), "text\tstars\n" + sentences.replace("\n", "\t5\n"))
    write(os.path.join(root, "long.tsv"), "text\nthe river\n" + "the river city school " * 10 + "\n")
    return root


@pytest.fixture(scope="module")
def results(root, mounts, tiny_tokenizer_path):
    """{case: (returncode, stderr)}; the subprocesses run at most PARALLEL at a time (each imports jax). Without
    tmpfs mounts, the cases that need one are left out."""
    mounted = make_mounts(root, mounts, tiny_tokenizer_path)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    places = dict(root=root, hf=HF_FIXTURE, ro=f"{root}/ro", full_export=f"{root}/full_export",
                  full_tokenizer=f"{root}/full_tokenizer")
    procs, done = {}, {}
    for name, (script, args, *_) in {**CASES, **WARNINGS}.items():
        if not mounted and any(m in a for a in args for m in MOUNTED):
            continue
        argv = [a.format(**places) for a in [*CORPUS_FLAGS.get(script, []), *args]]
        if len(procs) - len(done) >= PARALLEL:
            wait(procs, done, next(n for n in procs if n not in done))
        procs[name] = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=root, env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                       text=True)
    for name in procs:
        if name not in done:
            wait(procs, done, name)
    return done


PARALLEL = 12


def wait(procs: dict, done: dict, name: str) -> None:
    _, err = procs[name].communicate(timeout=600)
    done[name] = (procs[name].returncode, err)


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_and_exit_2(case, results, mounts):
    if case not in results:
        pytest.skip(f"needs a tmpfs mount: {mounts.error}")
    rc, err = results[case]
    _, _, says, must_not_say = CASES[case]
    lines = err.splitlines()
    if case in AFTER_WORK:
        assert sum(line.startswith("error: ") for line in lines) == 1
        lines = lines[-1:]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert says in lines[0], lines[0]
    assert must_not_say is None or must_not_say not in lines[0], lines[0]


@pytest.mark.parametrize("case", list(WARNINGS))
def test_one_warning_line_and_exit_0(case, results):
    rc, err = results[case]
    lines = err.splitlines()
    assert rc == 0 and len(lines) == 1 and lines[0].startswith("warning: ") and WARNINGS[case][2] in lines[0], err


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flag_is_one_line_and_exit_2(case, root, monkeypatch, capsys):
    script, args, says = FLAG_CASES[case]
    main = importlib.import_module(script.removesuffix(".py")).main
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "argv", [script, *(a.format(root=root) for a in [*CORPUS_FLAGS.get(script, []), *args])])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        common.run_main(main)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert says in lines[0], lines[0]


def test_help_keeps_the_whole_usage(capsys):
    import finetune

    with pytest.raises(SystemExit) as e:
        finetune.parse_args(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: ") and "--weight_decay" in out and "--max_train_examples" in out


def test_a_full_disk_leaves_no_partial_output(root, results, mounts):
    """hf.py --export and tokenizer.py on a full disk: no folder, no temporary, no tokenizer_config.json orphan
    that would block a rerun."""
    if "export_full_disk" not in results:
        pytest.skip(f"needs a tmpfs mount: {mounts.error}")
    assert os.listdir(os.path.join(root, "full_export")) == ["filler"]
    assert os.listdir(os.path.join(root, "full_tokenizer")) == ["filler"]


def test_finetune_results_on_a_full_disk_are_one_line(tmp_path, mounts, tiny_tokenizer_path, monkeypatch, capsys):
    """The disk fills up while finetune.py trains: writing its results is one error line, no traceback."""
    import finetune
    import glue

    disk = str(tmp_path / "disk")
    if not mounts.tmpfs(disk, "1m"):
        pytest.skip(f"needs a tmpfs mount: {mounts.error}")
    glue_dir = tmp_path / "glue" / "SST-2"
    glue_dir.mkdir(parents=True)
    rows = [("a fine river city", 1), ("the bad school team", 0)] * 8
    for split in ("train", "dev"):
        (glue_dir / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    (glue_dir / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, (s, _) in enumerate(rows)))
    write_submissions = glue.write_submissions

    def after_training_the_disk_is_full(*args, **kwargs):
        fill_disk(disk)
        return write_submissions(*args, **kwargs)

    monkeypatch.setattr(glue, "write_submissions", after_training_the_disk_is_full)
    out = os.path.join(disk, "glue")
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: finetune.main([
            "--task", "sst2", "--glue_dir", str(tmp_path / "glue"), "--from_scratch", "--tokenizer",
            tiny_tokenizer_path, "--model", "tiny", "--epochs", "1", "--out_dir", out]))
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: cannot write {out}/submission") and err.endswith(": No space left on device\n")
    bert.set_precision("fp32")
