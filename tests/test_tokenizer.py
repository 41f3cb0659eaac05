"""tokenizer.py: the tokenizer contract and the command line (the document sources: test_corpus.py)."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import common
import tokenizer
from common import CLS_ID, MASK_ID, PAD_ID, SEP_ID, UNK_ID, UserError
from tokenizer import build_tokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, os.path.join(ROOT, "tokenizer.py"), *map(str, args)],
                          capture_output=True, text=True, env=full_env, timeout=120)


def assert_user_error(result, *words):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0]


# --- the tokenizer ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return common.load_tokenizer(tiny_tokenizer_path)


def test_special_ids_fixed(tok):
    for token, want in [("[PAD]", PAD_ID), ("[UNK]", UNK_ID), ("[CLS]", CLS_ID), ("[SEP]", SEP_ID),
                        ("[MASK]", MASK_ID)]:
        assert tok.token_to_id(token) == want
    assert tok.get_vocab_size() <= 200


def test_single_and_pair_templates(tok):
    single = tok.encode("the river city")
    assert single.ids[0] == CLS_ID and single.ids[-1] == SEP_ID
    assert single.type_ids == [0] * len(single.ids)
    a = tok.encode("the river", add_special_tokens=False).ids
    b = tok.encode("a city of music", add_special_tokens=False).ids
    pair = tok.encode("the river", "a city of music")
    assert pair.ids == [CLS_ID, *a, SEP_ID, *b, SEP_ID]
    assert pair.type_ids == [0] * (len(a) + 2) + [1] * (len(b) + 1)


def test_decoder_round_trip(tok):
    text = "the university station was in the village of the county"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text  # special tokens skipped, "##" pieces glued back
    pieces = tok.encode("riverstationmusic", add_special_tokens=False).tokens
    assert len(pieces) > 1 and all(p.startswith("##") for p in pieces[1:])
    assert tok.decode(tok.encode("riverstationmusic").ids) == "riverstationmusic"


def test_unknown_character_is_unk(tok):
    assert tok.encode("\u4e2d", add_special_tokens=False).ids == [UNK_ID]


def test_uncased_strips_accents_and_cased_keeps_them(tiny_docs):
    docs = tiny_docs + ["Café Zürich"] * 5
    uncased = train_tokenizer(docs, vocab_size=300)
    cased = train_tokenizer(docs, vocab_size=300, cased=True)
    assert uncased.decode(uncased.encode("Café Zürich").ids) == "cafe zurich"
    assert cased.decode(cased.encode("Café Zürich").ids) == "Café Zürich"


def test_vocab_too_small_is_user_error(tiny_docs):
    with pytest.raises(UserError, match="vocab_size"):
        train_tokenizer(tiny_docs, vocab_size=5)


def test_file_neither_pads_nor_truncates(tok, tiny_tokenizer_path):
    spec = json.loads(open(tiny_tokenizer_path).read())
    assert spec["padding"] is None and spec["truncation"] is None
    short, long = tok.encode_batch(["the river", "the river city " * 300])
    assert len(short.ids) == len(tok.encode("the river").ids) and len(long.ids) > 900


def test_model_max_length_is_the_models_default():
    import model

    assert tokenizer.MODEL_MAX_LENGTH == model.BertConfig.__dataclass_fields__["max_position"].default


def test_transformers_loads_the_file_and_the_folder(tmp_path, tiny_tokenizer_path, tok):
    transformers = pytest.importorskip("transformers")
    text, config = tokenizer.for_transformers(tok)
    (tmp_path / "tokenizer.json").write_text(text)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    settings = {k: config[k] for k in (*tokenizer.SPECIAL_KEYS, "model_input_names")}  # the file's missing part
    texts = ["the river city", "a school of music and the village station"]
    for theirs in (transformers.PreTrainedTokenizerFast(tokenizer_file=tiny_tokenizer_path, **settings),
                   transformers.AutoTokenizer.from_pretrained(str(tmp_path))):
        assert [theirs.pad_token_id, theirs.unk_token_id, theirs.cls_token_id, theirs.sep_token_id,
                theirs.mask_token_id] == [PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID]
        ours = [tok.encode(t).ids for t in texts]
        assert theirs(texts)["input_ids"] == ours  # no padding unless asked
        assert theirs(texts, padding=True)["input_ids"] == [ours[0] + [PAD_ID] * (len(ours[1]) - len(ours[0])),
                                                           ours[1]]
        assert theirs("a", "b")["token_type_ids"] == [0, 0, 0, 1, 1]
    assert theirs.model_max_length == tokenizer.MODEL_MAX_LENGTH


def test_hand_built_tokenizer_follows_the_contract(tmp_path):
    vocab = {t: i for i, t in enumerate(common.SPECIAL_TOKENS + ["the", "river", "##s"])}
    path = tmp_path / "tok.json"
    path.write_text(build_tokenizer(vocab).to_str())
    tok = common.load_tokenizer(str(path))
    assert tok.encode("The rivers").ids == [CLS_ID, 5, 6, 7, SEP_ID]


def test_load_tokenizer_rejects_wrong_special_ids(tmp_path):
    vocab = {t: i for i, t in enumerate(["the"] + common.SPECIAL_TOKENS)}
    path = tmp_path / "tok.json"
    path.write_text(build_tokenizer(vocab).to_str())
    with pytest.raises(UserError, match=r"\[PAD\] at id 0"):
        common.load_tokenizer(str(path))


# --- the command line ------------------------------------------------------------------------------------------

def test_cli_trains_and_writes_one_file(tmp_path, tiny_docs):
    (tmp_path / "corpus.txt").write_text("\n".join(tiny_docs) + "\n")
    out = tmp_path / "tok.json"
    result = run_cli("--text_files", tmp_path / "*.txt", "--vocab_size", 256, "--out", out)
    assert result.returncode == 0, result.stderr
    assert f"{len(tiny_docs)} docs" in result.stdout
    tok = common.load_tokenizer(str(out))
    assert tok.get_vocab_size() <= 256
    assert json.loads(out.read_text())["padding"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "tok.json"]  # no temporary left behind


def test_cli_tokenizer_json_gets_a_config_and_is_replaced_only_with_overwrite(tmp_path, tiny_docs):
    (tmp_path / "corpus.txt").write_text("\n".join(tiny_docs) + "\n")
    (tmp_path / "hf").mkdir()
    out = tmp_path / "hf" / "tokenizer.json"
    args = ("--text_files", tmp_path / "corpus.txt", "--vocab_size", 256, "--out", out)
    assert run_cli(*args).returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    config = json.loads((out.parent / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "[PAD]" and config["model_max_length"] == tokenizer.MODEL_MAX_LENGTH
    out.write_text("mine")
    assert_user_error(run_cli(*args), str(out), "--overwrite")
    assert out.read_text() == "mine"
    assert run_cli(*args, "--overwrite").returncode == 0
    common.load_tokenizer(str(out))


def test_cli_bad_inputs(tmp_path):
    out = tmp_path / "tok.json"
    assert_user_error(run_cli("--text_files", tmp_path / "missing*", "--out", out), "no files match")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(run_cli("--text_files", tmp_path / "empty.txt", "--out", out), "no documents")
    (tmp_path / "adir").mkdir()
    assert_user_error(run_cli("--text_files", tmp_path / "adir", "--out", out), "is a directory")
    assert_user_error(run_cli("--text_files", tmp_path / "empty.txt", "--out", tmp_path / "no" / "tok.json"),
                      "does not exist")
    assert_user_error(run_cli("--text_files", "/dev/zero", "--out", out), "/dev/zero is not a regular file")
    assert not out.exists()


@pytest.mark.parametrize("asked, says", [(6, "more than --vocab_size 6: the trainer keeps every character"),
                                         (5000, "fewer than --vocab_size 5000: the corpus has too few")])
def test_cli_says_when_the_vocabulary_size_differs_from_the_request(tmp_path, tiny_docs, asked, says):
    (tmp_path / "corpus.txt").write_text("\n".join(tiny_docs) + "\n")
    result = run_cli("--text_files", tmp_path / "corpus.txt", "--vocab_size", asked, "--out", tmp_path / "tok.json")
    assert result.returncode == 0, result.stderr
    size = common.load_tokenizer(str(tmp_path / "tok.json")).get_vocab_size()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: the vocabulary has {size} tokens, " + says + warnings[0].split(says)[1]]


def test_corpus_without_a_word_is_refused(tmp_path):
    (tmp_path / "nul.txt").write_bytes(b"\0" * 100 + b"\n\0\0 \0\n")
    with pytest.raises(UserError, match="special tokens alone"):
        train_tokenizer(["\0" * 100, "\0\0 \0"], vocab_size=100)
    result = run_cli("--text_files", tmp_path / "nul.txt", "--out", tmp_path / "tok.json")
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # after the reading progress bar
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(errors) == 1
    assert result.stderr.strip().splitlines()[-1] == errors[0] and "special tokens alone" in errors[0]
    assert not (tmp_path / "tok.json").exists()


def test_cli_without_network_fails_fast_with_the_way_out(tmp_path):
    with socket.socket() as s:  # a port on this machine that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.time()
    result = run_cli("--out", tmp_path / "tok.json", env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"})
    assert time.time() - start < 10
    assert_user_error(result, "cannot reach the Hugging Face Hub", "--text_files")
    assert not (tmp_path / "tok.json").exists()
