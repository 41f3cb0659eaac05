"""Every script's user mistakes, through the real command line: exit code 2, one stderr line starting "error:",
no traceback. The subprocesses start together (most of their time is importing jax) and are collected per case."""
import dataclasses
import hashlib
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
from conftest import damage_checkpoint, fill_disk  # noqa: E402

HF_FIXTURE = os.path.join(ROOT, "tests", "data", "hf_tiny_bert")
COORDINATOR = ["--coordinator", "localhost:12345"]

# name: (script, arguments ({root}: the fixtures' folder, {hf}: the Hugging Face fixture; {ro}: a read-only tmpfs,
# {full_export}, {full_tokenizer}: full ones), what the line must say, and what it must not say (a misleading hint),
# if anything). Scripts run in {root}: train.py's defaults data/ and tokenizer.json are the good ones there.
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
    for name, (script, args, _, _) in CASES.items():
        if not mounted and any(m in a for a in args for m in MOUNTED):
            continue
        argv = [a.format(**places) for a in [*CORPUS_FLAGS.get(script, []), *args]]
        if len(procs) - len(done) >= PARALLEL:
            wait(procs, done, next(n for n in procs if n not in done))
        procs[name] = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *argv], cwd=root, env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
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
