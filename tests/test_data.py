"""data.py: the token files, the split, safe output, the reader, and bad input through the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import common
import data
from common import SEP_ID, UserError
from conftest import fill_disk
from tokenizer import build_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def read_bin(out, split):
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=meta["dtype"])


def split_docs(tokens):
    """Token lists of the documents in a stream (each ends with one [SEP])."""
    assert len(tokens) == 0 or tokens[-1] == SEP_ID
    ends = np.flatnonzero(tokens == SEP_ID)
    return [tokens[a + 1 if i else 0:b].tolist() for i, (a, b) in enumerate(zip(np.r_[-1, ends[:-1]], ends))]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return common.load_tokenizer(tiny_tokenizer_path)


def test_streams_hold_every_document_once_followed_by_sep(tmp_path, tiny_docs, tiny_tokenizer_path, tok):
    out = tmp_path / "data"
    meta = data.prepare(tiny_docs, tiny_tokenizer_path, str(out), val_fraction=0.2, sources=["x"],
                        batch_bytes=500, progress=False)  # small batches: many batch boundaries
    want = [tok.encode(d, add_special_tokens=False).ids for d in tiny_docs]
    in_val = [data.is_val(i, 0.2, None) for i in range(len(tiny_docs))]
    assert 0 < sum(in_val) < len(tiny_docs)
    train, val = read_bin(out, "train"), read_bin(out, "val")
    assert split_docs(train) == [w for w, v in zip(want, in_val) if not v]  # in order, whole documents
    assert split_docs(val) == [w for w, v in zip(want, in_val) if v]
    assert len(train) + len(val) == sum(len(w) + 1 for w in want)
    assert meta == json.loads((out / "meta.json").read_text())
    assert meta["splits"] == {"train": {"tokens": len(train), "docs": len(tiny_docs) - sum(in_val)},
                              "val": {"tokens": len(val), "docs": sum(in_val)}}
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == tok.get_vocab_size() and meta["sources"] == ["x"]
    assert meta["tokenizer_sha256"] == common.sha256_file(tiny_tokenizer_path)
    assert meta["special_ids"] == {t: i for i, t in enumerate(common.SPECIAL_TOKENS)}
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]


def test_val_docs_takes_the_first_documents(tmp_path, tiny_docs, tiny_tokenizer_path, tok):
    out = tmp_path / "data"
    meta = data.prepare(tiny_docs, tiny_tokenizer_path, str(out), val_docs=7, progress=False)
    assert meta["splits"]["val"]["docs"] == 7 and meta["split_rule"] == {"val_docs": 7}
    assert split_docs(read_bin(out, "val")) == [tok.encode(d, add_special_tokens=False).ids for d in tiny_docs[:7]]
    with pytest.raises(UserError, match="all 200 documents went to val"):
        data.prepare(tiny_docs, tiny_tokenizer_path, str(tmp_path / "d2"), val_docs=500, progress=False)
    assert not os.path.exists(tmp_path / "d2" / "meta.json")


def test_split_rule_is_a_fixed_hash_of_the_index():
    picks = [data.is_val(i, 0.1, None) for i in range(20000)]
    assert picks == [data.is_val(i, 0.1, None) for i in range(20000)]
    assert 0.09 < np.mean(picks) < 0.11
    assert not any(data.is_val(i, 0.0, None) for i in range(1000))
    assert [data.is_val(i, 0.5, 3) for i in range(5)] == [True, True, True, False, False]


def test_dtype_switches_above_65536():
    assert data.token_dtype(65536) == np.uint16
    assert data.token_dtype(65537) == np.uint32


def test_large_vocab_is_stored_as_uint32(tmp_path):
    words = [f"w{i}" for i in range(70000)]
    vocab = {t: i for i, t in enumerate(common.SPECIAL_TOKENS + words)}
    path = tmp_path / "big.json"
    path.write_text(build_tokenizer(vocab).to_str())
    docs = ["w69999 w0", "w65535 w65536 w3"]
    meta = data.prepare(docs, str(path), str(tmp_path / "data"), val_fraction=0.0, progress=False)
    assert meta["dtype"] == "uint32"
    assert read_bin(tmp_path / "data", "train").tolist() == [70004, 5, SEP_ID, 65540, 65541, 8, SEP_ID]
    reader = data.TokenReader(str(tmp_path / "data"), "train", seq_len=6, seed=0)
    assert reader.batch(0, 4).max() <= 70004 and reader.batch(0, 4).dtype == np.int32


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_docs, tiny_tokenizer_path):
    out = tmp_path_factory.mktemp("prepared") / "data"
    data.prepare(tiny_docs * 5, tiny_tokenizer_path, str(out), val_fraction=0.1, progress=False)
    return str(out)


def test_reader_batches_are_windows_and_deterministic(prepared):
    reader = data.TokenReader(prepared, "train", seq_len=16, seed=3)
    stream = np.fromfile(os.path.join(prepared, "train.bin"), dtype=reader.meta["dtype"]).astype(np.int32)
    a = reader.batch(step=5, batch_size=8)
    assert a.shape == (8, 16) and a.dtype == np.int32 and a.flags["C_CONTIGUOUS"]
    windows = np.lib.stride_tricks.sliding_window_view(stream, 16)
    for row in a:
        assert (windows == row).all(axis=1).any()
    again = data.TokenReader(prepared, "train", seq_len=16, seed=3)
    np.testing.assert_array_equal(a, again.batch(step=5, batch_size=8))
    assert not np.array_equal(a, reader.batch(step=6, batch_size=8))
    assert not np.array_equal(a, data.TokenReader(prepared, "train", seq_len=16, seed=4).batch(5, 8))
    assert reader.num_tokens == len(stream) and reader.vocab_size == reader.meta["vocab_size"]


def test_reader_checks_tokenizer_and_length(prepared, tiny_tokenizer_path):
    sha = common.sha256_file(tiny_tokenizer_path)
    assert data.TokenReader(prepared, "val", seq_len=8, seed=0, tokenizer_sha256=sha).num_tokens > 0
    with pytest.raises(UserError, match=f"different tokenizer: sha256 {sha} in meta.json, {'0' * 64} given"):
        data.TokenReader(prepared, "train", seq_len=8, seed=0, tokenizer_sha256="0" * 64)
    n = data.load_meta(prepared)["splits"]["val"]["tokens"]
    with pytest.raises(UserError, match=f"has {n} tokens, fewer than seq_len \\+ 1 = {n + 1}"):
        data.TokenReader(prepared, "val", seq_len=n, seed=0)
    assert data.TokenReader(prepared, "val", seq_len=n - 1, seed=0).batch(0, 2).shape == (2, n - 1)
    vocab = data.load_meta(prepared)["vocab_size"]
    with pytest.raises(UserError, match=f"says vocab_size {vocab}, the tokenizer has 100 tokens"):
        data.TokenReader(prepared, "train", seq_len=8, seed=0, tokenizer_sha256=sha, vocab_size=100)


def test_tokenizer_file_with_padding_on_makes_the_same_data(tmp_path, tiny_docs, tiny_tokenizer_path):
    old = common.load_tokenizer(tiny_tokenizer_path)  # tokenizer.py's files had padding switched on before
    old.enable_padding(pad_id=common.PAD_ID, pad_token="[PAD]")
    (tmp_path / "old.json").write_text(old.to_str())
    for name, path in (("new", tiny_tokenizer_path), ("old", str(tmp_path / "old.json"))):
        data.prepare(tiny_docs, path, str(tmp_path / name), batch_bytes=500, progress=False)
    for split in data.SPLITS:
        np.testing.assert_array_equal(read_bin(tmp_path / "old", split), read_bin(tmp_path / "new", split))


def test_truncated_bin_is_refused(tmp_path, tiny_docs, tiny_tokenizer_path):
    out = tmp_path / "data"
    data.prepare(tiny_docs, tiny_tokenizer_path, str(out), progress=False)
    with open(out / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError, match="train.bin is missing or has 10 bytes"):
        data.load_meta(str(out))


def failing_after(docs, n):
    yield from docs[:n]
    raise RuntimeError("killed")


def test_interrupted_run_leaves_nothing_accepted(tmp_path, tiny_docs, tiny_tokenizer_path):
    out = tmp_path / "data"
    with pytest.raises(RuntimeError, match="killed"):
        data.prepare(failing_after(tiny_docs, 150), tiny_tokenizer_path, str(out), batch_bytes=100, progress=False)
    assert os.listdir(out) == []  # temporaries removed, no meta.json
    with pytest.raises(UserError, match="no complete data"):
        data.load_meta(str(out))
    # an interrupted --overwrite run must not leave the old meta.json vouching for a mix of old and new files
    (out / "train.bin.tmp.999999").write_bytes(b"left by a killed run")
    data.prepare(tiny_docs, tiny_tokenizer_path, str(out), progress=False)
    assert sorted(os.listdir(out)) == ["meta.json", "train.bin", "val.bin"]
    data.load_meta(str(out))
    with pytest.raises(RuntimeError, match="killed"):
        data.prepare(failing_after(tiny_docs, 150), tiny_tokenizer_path, str(out), overwrite=True, progress=False)
    with pytest.raises(UserError, match="no complete data"):
        data.TokenReader(str(out), "train", seq_len=8, seed=0)


def test_refuses_existing_data_unless_overwrite(tmp_path, tiny_docs, tiny_tokenizer_path):
    out = tmp_path / "data"
    data.prepare(tiny_docs, tiny_tokenizer_path, str(out), progress=False)
    before = read_bin(out, "train")
    with pytest.raises(UserError, match="already holds complete data.*--overwrite"):
        data.prepare(tiny_docs[:10], tiny_tokenizer_path, str(out), progress=False)
    np.testing.assert_array_equal(read_bin(out, "train"), before)
    meta = data.prepare(tiny_docs[:10], tiny_tokenizer_path, str(out), overwrite=True, progress=False)
    assert meta["splits"]["train"]["docs"] + meta["splits"]["val"]["docs"] == 10
    assert data.load_meta(str(out)) == meta


# --- the command line ------------------------------------------------------------------------------------------

@pytest.fixture()
def corpus(tmp_path, tiny_docs):
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\n".join(tiny_docs) + "\n").encode() + b"bad byte \xff here\n")
    return path


def test_cli_writes_data_then_refuses_then_overwrites(tmp_path, corpus, tiny_docs, tiny_tokenizer_path):
    out = tmp_path / "data"
    args = ["--tokenizer", tiny_tokenizer_path, "--out", out, "--text_files", corpus]
    result = run_cli(*args, "--val_docs", 5)
    assert result.returncode == 0, result.stderr
    assert "val 5 docs" in result.stdout and "1 undecodable bytes replaced" in result.stdout
    meta = data.load_meta(str(out), common.sha256_file(tiny_tokenizer_path))
    assert meta["splits"]["train"]["docs"] == len(tiny_docs) + 1 - 5
    assert meta["sources"] == [str(corpus)] and meta["stats"]["replaced_bytes"] == 1
    assert_user_error(run_cli(*args), "already holds complete data", "--overwrite")
    assert data.load_meta(str(out)) == meta
    result = run_cli(*args, "--overwrite", "--num_docs", 20)
    assert result.returncode == 0, result.stderr
    assert data.load_meta(str(out))["splits"]["train"]["docs"] + data.load_meta(str(out))["splits"]["val"]["docs"] == 20


def test_cli_bad_inputs_touch_nothing(tmp_path, corpus, tiny_docs, tiny_tokenizer_path):
    out = tmp_path / "data"
    tok = ["--tokenizer", tiny_tokenizer_path]
    assert_user_error(run_cli(*tok, "--out", out, "--text_files", tmp_path / "nothing*"), "no files match")
    (tmp_path / "empty.txt").write_text("\n \n")
    assert_user_error(run_cli(*tok, "--out", out, "--text_files", tmp_path / "empty.txt"), "no documents")
    (tmp_path / "adir").mkdir()
    assert_user_error(run_cli(*tok, "--out", out, "--text_files", tmp_path / "adir"), "is a directory")
    assert_user_error(run_cli("--tokenizer", tmp_path / "none.json", "--out", out, "--text_files", corpus),
                      "tokenizer file not found")
    (tmp_path / "corrupt.json").write_text('{"version": "1.0", "model": ')
    assert_user_error(run_cli("--tokenizer", tmp_path / "corrupt.json", "--out", out, "--text_files", corpus),
                      "cannot read tokenizer")
    assert_user_error(run_cli(*tok, "--out", corpus / "data", "--text_files", corpus), "is a file")
    assert not out.exists()


def test_cli_data_from_another_tokenizer(tmp_path, corpus, tiny_docs, tiny_tokenizer_path):
    out = tmp_path / "data"
    data.prepare(tiny_docs, tiny_tokenizer_path, str(out), progress=False)
    other = tmp_path / "other.json"
    vocab = {t: i for i, t in enumerate(common.SPECIAL_TOKENS + ["the", "river"])}
    other.write_text(build_tokenizer(vocab).to_str())
    before = (out / "meta.json").read_text()
    assert_user_error(run_cli("--tokenizer", other, "--out", out, "--text_files", corpus),
                      "different tokenizer", common.sha256_file(tiny_tokenizer_path), common.sha256_file(str(other)))
    assert (out / "meta.json").read_text() == before


@pytest.mark.parametrize("flags, warns", [(["--val_fraction", 0], "val has 0 documents, 0 tokens"),
                                          (["--val_docs", 2], "val has 2 documents"),
                                          (["--val_docs", 40], None)])
def test_cli_warns_of_a_validation_split_train_py_would_refuse(tmp_path, corpus, tiny_tokenizer_path, flags, warns):
    result = run_cli("--tokenizer", tiny_tokenizer_path, "--out", tmp_path / "data", "--text_files", corpus, *flags)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    val_tokens = data.load_meta(str(tmp_path / "data"))["splits"]["val"]["tokens"]
    if warns is None:
        assert warnings == [] and val_tokens >= data.VAL_TOKENS_NEEDED
    else:
        assert len(warnings) == 1 and warns in warnings[0] and "--eval_windows 0" in warnings[0]
        assert val_tokens < data.VAL_TOKENS_NEEDED


# --- ids beyond the vocabulary, full disks -----------------------------------------------------------------------

def test_ids_beyond_the_vocabulary_are_found_by_verify_and_sampled_by_the_reader(tmp_path, tiny_docs,
                                                                                 tiny_tokenizer_path):
    out = tmp_path / "data"
    meta = data.prepare(tiny_docs * 150, tiny_tokenizer_path, str(out), val_docs=20, progress=False)
    result = run_cli("--verify", "--out", out, "--tokenizer", tiny_tokenizer_path)
    assert result.returncode == 0 and f"every id below {meta['vocab_size']}" in result.stdout, result.stderr
    data.TokenReader(str(out), "train", seq_len=8, seed=0)
    tokens = np.memmap(out / "train.bin", dtype=meta["dtype"], mode="r+")
    n = len(tokens)
    assert n > 2 * 64 * 4096  # the sample reads part of the file, verify all of it
    far = next(i for i in range(n // 2, n) if all(not s <= i < s + 4096 for s in
                                                  np.linspace(0, n - 4096, 64).astype(int)))
    tokens[far] = meta["vocab_size"]  # one bad id outside every sampled block: only --verify finds it
    tokens.flush()
    data.TokenReader(str(out), "train", seq_len=8, seed=0)
    assert_user_error(run_cli("--verify", "--out", out, "--tokenizer", tiny_tokenizer_path),
                      f"train.bin holds token id {meta['vocab_size']} at position {far}, not below the vocabulary")
    tokens[0] = tokens[n - 1] = 65535  # where the sample looks
    tokens.flush()
    with pytest.raises(UserError, match=r"holds token id 65535 at position 0, .* \(2 such ids in a sample\)"):
        data.TokenReader(str(out), "train", seq_len=8, seed=0)
    assert "(3 such ids)" in run_cli("--verify", "--out", out, "--tokenizer", tiny_tokenizer_path).stderr


@pytest.fixture()
def small_disk(tmp_path, mounts):
    folder = str(tmp_path / "disk")
    if not mounts.tmpfs(folder, "1m"):
        pytest.skip(f"needs a tmpfs mount: {mounts.error}")
    return folder


def test_a_full_disk_at_meta_json_is_one_line_and_leaves_no_complete_data(small_disk, tiny_docs,
                                                                          tiny_tokenizer_path, monkeypatch, capsys):
    write_splits = data._write_splits

    def then_the_disk_is_full(*args, **kwargs):
        written = write_splits(*args, **kwargs)
        fill_disk(small_disk)
        return written

    monkeypatch.setattr(data, "_write_splits", then_the_disk_is_full)
    out = os.path.join(small_disk, "data")
    with pytest.raises(SystemExit) as e:
        common.run_main(lambda: data.prepare(tiny_docs, tiny_tokenizer_path, out, progress=False))
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: cannot write {out}/meta.json: No space left on device\n"
    assert sorted(os.listdir(out)) == ["train.bin", "val.bin"]  # no meta.json: no reader accepts the folder
