"""Every script's user mistakes, through the real command line: exit code 2, one stderr line starting "error:",
no traceback. The subprocesses start together (most of their time is importing jax) and are collected per case.
The flags' domains (FLAG_CASES) run in this process through each script's main() and common.run_main, as
`python SCRIPT.py ARGS` would, without an interpreter start for each."""
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
from conftest import damage_checkpoint  # noqa: E402

HF_FIXTURE = os.path.join(ROOT, "tests", "data", "hf_tiny_bert")
COORDINATOR = ["--coordinator", "localhost:12345"]

# name: (script, arguments ({root}: the fixtures' folder, {hf}: the Hugging Face fixture), what the line must say,
# and what it must not say (a misleading hint), if anything). Scripts run in {root}: train.py's defaults data/ and
# tokenizer.json are the good ones there.
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
CORPUS_FLAGS = {"tokenizer.py": ["--text_files", "corpus.txt"],
                "data.py": ["--text_files", "corpus.txt", "--tokenizer", "tokenizer.json"]}


def edited_copy(src: str, dst: str, edit) -> None:
    shutil.copytree(src, dst)
    meta = json.loads(open(os.path.join(dst, "meta.json")).read())
    edit(meta)
    with open(os.path.join(dst, "meta.json"), "w") as f:
        json.dump(meta, f)


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
    checkpoint.save_checkpoint(os.path.join(root, "trained"), state, {"params/a/w": np.ones(2)}, b"tok", keep=1)

    for step, fault in ((1, "truncate"), (2, "empty_state"), (3, "bitflip")):
        folder = checkpoint.save_checkpoint(os.path.join(root, "ckpts"), dict(step=step, tokens_seen=step),
                                            {"params/a/w": np.ones((64, 64))}, b"tok", keep=3)
        damage_checkpoint(folder, fault)

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = {}
    for name, (script, args, _, _) in CASES.items():
        argv = [a.format(root=root, hf=HF_FIXTURE) for a in [*CORPUS_FLAGS.get(script, []), *args]]
        procs[name] = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=root, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    done = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        done[name] = (proc.returncode, err)
    return root, done


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_and_exit_2(case, results):
    rc, err = results[1][case]
    _, _, says, must_not_say = CASES[case]
    lines = err.splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err[-2000:]
    assert says in lines[0], lines[0]
    assert must_not_say is None or must_not_say not in lines[0], lines[0]


@pytest.mark.parametrize("case", list(FLAG_CASES))
def test_flag_is_one_line_and_exit_2(case, results, monkeypatch, capsys):
    root = results[0]
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
