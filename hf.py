"""Real BERT weights in and out: import a Hugging Face BERT folder as model.py parameters, and export a train.py
checkpoint as a folder that transformers loads with no custom code.

    python hf.py --tokenizer BERT_DIR tok.json             # its tokenizer, converted (for data.py)
    python train.py --init_hf BERT_DIR --data_dir data ...  # continued pretraining (data made with tok.json)
    python finetune.py --task sst2 --init_hf BERT_DIR ...   # GLUE from its weights
    python hf.py --export out/ckpt_00001000 hf_out          # post-LN: BertForMaskedLM, pre-LN: RobertaPreLayerNorm
    python hf.py --export out/glue/SST-2.model hf_sst2      # a finetuned classifier: ...ForSequenceClassification
    python hf.py --export out hf_out --dtype bf16 --shard_mb 15  # bfloat16 weights in files under 15 MiB

Import (load_hf) reads config.json, model.safetensors (or its sharded index) and tokenizer.json, or vocab.txt with
tokenizer_config.json. Only BERT itself maps exactly (model_type bert, exact GELU, absolute positions: our post-LN
layout); anything else is refused by name, as is a missing, extra or mis-shaped encoder tensor. Heads are optional:
the pooler, the MLM head (decoder tied to the word embeddings) and the classifier of a BertForSequenceClassification
(or of a RobertaPreLayerNormForSequenceClassification as export writes it) are imported when present, with the
classifier's label names; each script initialises the heads it needs but the checkpoint lacks, with a notice.

Special-token ids: this codebase fixes [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, Google's BERT vocabularies have
[PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103. The importer swaps ids so that the five land on 0..4 (for BERT the
swaps 1<->100, 2<->101, 3<->102, 4<->103; computed from the vocabulary in general), permutes the rows of the word
embeddings and the MLM output bias the same way, and writes the tokenizer with the swapped vocabulary. Text ->
tokenizer -> model is then the same function as in transformers, only the ids are renamed: info["new_id"][old_id].

Export: a pre-LN model is transformers' RobertaPreLayerNorm, whose position ids start at pad_token_id + 1 = 1 for
tokens that are not [PAD]; the exported position table therefore has one zero row in front. The two agree wherever
[PAD] appears only as right padding under the attention mask (as in train.py and finetune.py), at every position
that is not padding.
"""
import json
import math
import os
import re

import numpy as np
from tokenizers import AddedToken, models, normalizers

import checkpoint
import common
import model as bert
from common import PAD_ID, SPECIAL_TOKENS, UserError, first_line
from tokenizer import SPECIAL_KEYS, build_tokenizer, for_transformers

# model_type -> (prefix of the encoder's tensors in the *For...* classes, the class export writes)
LAYOUTS = {"bert": ("bert.", "BertForMaskedLM"),
           "roberta-prelayernorm": ("roberta_prelayernorm.", "RobertaPreLayerNormForMaskedLM")}
CLASSIFIERS = {"bert": "BertForSequenceClassification",  # what a finetune.py model folder exports as
               "roberta-prelayernorm": "RobertaPreLayerNormForSequenceClassification"}
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-weights some checkpoints carry
EXPORT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
SHARD_INDEX = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")  # transformers' names for the shards an index lists
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a JSON object")
    return obj


# ----------------------------------------------------------------------------------------------------------
# Config and tokenizer

def read_config(hf_dir: str) -> tuple[bert.BertConfig, dict]:
    """config.json -> (our config, the raw dict); an architecture that does not map exactly is a UserError."""
    if not os.path.isdir(hf_dir):
        raise UserError(f"{hf_dir} is not a folder (expected a Hugging Face model folder with config.json)")
    raw = _read_json(os.path.join(hf_dir, "config.json"))
    model_type = raw.get("model_type")
    if model_type not in LAYOUTS:
        raise UserError(f"{hf_dir}: model_type {model_type!r} is not supported: only 'bert' (and "
                        "'roberta-prelayernorm' as written by hf.py --export)")
    differ = []
    if raw.get("hidden_act", "gelu") != "gelu":
        differ.append(f"hidden_act {raw['hidden_act']!r} (this model has the exact erf GELU, 'gelu')")
    if raw.get("position_embedding_type", "absolute") != "absolute":
        differ.append(f"position_embedding_type {raw['position_embedding_type']!r} (only 'absolute')")
    differ += [f"{flag} true (an encoder only)" for flag in ("is_decoder", "add_cross_attention") if raw.get(flag)]
    if differ:
        raise UserError(f"{hf_dir}: architecture differs from this BERT: {', '.join(differ)}")
    path = os.path.join(hf_dir, "config.json")
    whole = {k: _number(raw, path, k, int, None) for k in ("vocab_size", "num_hidden_layers", "hidden_size",
                                                            "num_attention_heads", "intermediate_size")}
    if raw.get("pad_token_id") is not None:  # null: no padding token, as some configs say
        _number(raw, path, "pad_token_id", int, None)
    cfg = bert.BertConfig(
        vocab_size=whole["vocab_size"], num_layers=whole["num_hidden_layers"], hidden_size=whole["hidden_size"],
        num_heads=whole["num_attention_heads"], intermediate_size=whole["intermediate_size"],
        max_position=_number(raw, path, "max_position_embeddings", int, 512) - _position_offset(raw),
        type_vocab_size=_number(raw, path, "type_vocab_size", int, 2), post_ln=model_type == "bert",
        layer_norm_eps=float(_number(raw, path, "layer_norm_eps", float, 1e-12)),
        dropout=float(_number(raw, path, "hidden_dropout_prob", float, 0.1)))
    return cfg, raw


def _number(raw: dict, path: str, key: str, kind: type, default: int | float | None):
    """raw[key] (default if absent; None: required), checked to be a whole number (kind int) or a finite number."""
    if key not in raw and default is not None:
        return default
    if key not in raw:
        raise UserError(f"{path} lacks {key!r}")
    value = raw[key]
    if (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int)
            or not math.isfinite(value)):
        raise UserError(f"{path}: {key} is {value!r}, not " + ("a whole number" if kind is int else "a number"))
    return value


def _position_offset(raw: dict) -> int:
    """Rows in front of the position table: RoBERTa's position ids start at pad_token_id + 1, BERT's at 0."""
    return raw.get("pad_token_id", 1) + 1 if raw.get("model_type") == "roberta-prelayernorm" else 0


def convert_tokenizer(hf_dir: str, vocab_size: int) -> tuple[bytes, np.ndarray]:
    """The folder's WordPiece tokenizer with the five special tokens moved to ids 0..4.

    -> (tokenizer.json bytes, new_id [V] int: new_id[old id] is a token's id after the swap). The vocabulary must
    have exactly vocab_size tokens (the embedding rows): every id must mean one token in both directions.
    """
    settings_path = os.path.join(hf_dir, "tokenizer_config.json")
    settings = _read_json(settings_path) if os.path.isfile(settings_path) else {}
    for key, want in zip(SPECIAL_KEYS, SPECIAL_TOKENS):
        got = settings.get(key, want)
        got = got.get("content") if isinstance(got, dict) else got
        if got != want:
            raise UserError(f"{settings_path}: {key} is {got!r}; this codebase needs BERT's {want}")
    path = os.path.join(hf_dir, "tokenizer.json")
    if os.path.isfile(path):
        spec = _read_json(path)
        wordpiece = spec.get("model") or {}
        if wordpiece.get("type") != "WordPiece" or wordpiece.get("continuing_subword_prefix", "##") != "##":
            raise UserError(f"{path}: model {wordpiece.get('type')!r}, not BERT's WordPiece with ## continuations")
        for part, want in (("normalizer", "BertNormalizer"), ("pre_tokenizer", "BertPreTokenizer")):
            got = (spec.get(part) or {}).get("type")
            if got != want:
                raise UserError(f"{path}: {part} {got!r}, not BERT's {want}")
        vocab, normalizer, added = wordpiece.get("vocab") or {}, spec["normalizer"], spec.get("added_tokens") or []
        max_chars = wordpiece.get("max_input_chars_per_word", 100)
    else:
        vocab_path = os.path.join(hf_dir, "vocab.txt")
        if not os.path.isfile(vocab_path):
            raise UserError(f"{hf_dir} has no tokenizer.json and no vocab.txt")
        with open(vocab_path, encoding="utf-8") as f:  # read as transformers' BertTokenizer reads it
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        normalizer, added, max_chars = {}, [], 100
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{hf_dir}: the vocabulary's ids are not 0..{len(vocab) - 1}, one per token "
                        "(a duplicate token?)")
    if len(vocab) != vocab_size:
        raise UserError(f"{hf_dir}: the tokenizer has {len(vocab)} tokens, config.json's vocab_size is {vocab_size}; "
                        "this codebase needs one embedding row per token")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"{hf_dir}: the vocabulary lacks {', '.join(missing)}")
    if not isinstance(added, list) or not all(isinstance(t, dict) and isinstance(t.get("content"), str)
                                              for t in added):
        raise UserError(f"{hf_dir}/tokenizer.json: an added_tokens entry has no 'content' string")
    outside = [t["content"] for t in added if t["content"] not in vocab]
    if outside:
        raise UserError(f"{hf_dir}: added token(s) outside the WordPiece vocabulary are not supported: {outside[:5]}")

    old_of_new = np.arange(len(vocab))  # which original token each id holds; swapped into place one by one
    for k, token in enumerate(SPECIAL_TOKENS):
        j = int(np.flatnonzero(old_of_new == vocab[token])[0])
        old_of_new[[k, j]] = old_of_new[[j, k]]
    new_id = np.argsort(old_of_new)
    swapped = {token: int(new_id[i]) for token, i in vocab.items()}

    # As transformers' BertTokenizer: tokenizer_config.json's settings win over tokenizer.json's normalizer.
    tok = build_tokenizer(swapped)
    tok.model = models.WordPiece(swapped, unk_token="[UNK]", continuing_subword_prefix="##",
                                 max_input_chars_per_word=max_chars)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=normalizer.get("clean_text", True),
        handle_chinese_chars=settings.get("tokenize_chinese_chars", normalizer.get("handle_chinese_chars", True)),
        strip_accents=settings.get("strip_accents", normalizer.get("strip_accents")),
        lowercase=settings.get("do_lower_case", normalizer.get("lowercase", True)))
    flags = {t: {"special": True} for t in SPECIAL_TOKENS} | {a["content"]: a for a in added}
    for content in sorted(flags, key=swapped.get):  # tokenizer.json's added tokens keep their settings
        a = flags[content]
        token = AddedToken(content, single_word=a.get("single_word", False), lstrip=a.get("lstrip", False),
                           rstrip=a.get("rstrip", False), normalized=a.get("normalized", False))
        (tok.add_special_tokens if a.get("special", True) else tok.add_tokens)([token])
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert tok.get_vocab_size() == vocab_size
    # Padding is part of these bytes because train.py --init_hf knows data made with them by their sha256.
    tok.enable_padding(pad_id=PAD_ID, pad_token="[PAD]", pad_type_id=0)
    return tok.to_str(pretty=True).encode(), new_id


# ----------------------------------------------------------------------------------------------------------
# Tensor names: our module -> {param: [transformers tensors]}. A Dense "w" [in, out] is the torch Linear weights
# [out, in] transposed and side by side (query, key, value for "qkv"); every other param is them end to end.

def _dense(name: str) -> dict:
    return {"w": [f"{name}.weight"], "b": [f"{name}.bias"]}


def _norm(name: str) -> dict:
    return {"scale": [f"{name}.weight"], "offset": [f"{name}.bias"]}


def _names(cfg: bert.BertConfig, base: str) -> tuple[dict, dict]:
    """(encoder, heads) for cfg's layout with encoder prefix base; heads: head name -> {module: ...}."""
    e = f"{base}embeddings"
    encoder = {"bert/embeddings/word": {"embeddings": [f"{e}.word_embeddings.weight"]},
               "bert/embeddings/position": {"embeddings": [f"{e}.position_embeddings.weight"]},
               "bert/embeddings/token_type": {"embeddings": [f"{e}.token_type_embeddings.weight"]},
               "bert/embeddings/layer_norm": _norm(f"{e}.LayerNorm")}
    attention_norm, mlp_norm = (("attention.output.LayerNorm", "output.LayerNorm") if cfg.post_ln
                                else ("attention.LayerNorm", "intermediate.LayerNorm"))
    for i in range(cfg.num_layers):
        ours, hf = f"bert/layer_{i}", f"{base}encoder.layer.{i}"
        qkv = [f"{hf}.attention.self.{x}" for x in ("query", "key", "value")]
        encoder[f"{ours}/attention/qkv"] = {"w": [f"{n}.weight" for n in qkv], "b": [f"{n}.bias" for n in qkv]}
        encoder[f"{ours}/attention/output"] = _dense(f"{hf}.attention.output.dense")
        encoder[f"{ours}/mlp/intermediate"] = _dense(f"{hf}.intermediate.dense")
        encoder[f"{ours}/mlp/output"] = _dense(f"{hf}.output.dense")
        encoder[f"{ours}/attention_layer_norm"] = _norm(f"{hf}.{attention_norm}")
        encoder[f"{ours}/mlp_layer_norm"] = _norm(f"{hf}.{mlp_norm}")
    if cfg.post_ln:
        mlm = {"mlm_head/transform": _dense("cls.predictions.transform.dense"),
               "mlm_head/layer_norm": _norm("cls.predictions.transform.LayerNorm"),
               "mlm_head": {"output_bias": ["cls.predictions.bias"]}}
    else:
        encoder["bert/final_layer_norm"] = _norm(f"{base}LayerNorm")
        mlm = {"mlm_head/transform": _dense("lm_head.dense"), "mlm_head/layer_norm": _norm("lm_head.layer_norm"),
               "mlm_head": {"output_bias": ["lm_head.bias"]}}
    heads = {"pooler": {"bert/pooler/dense": _dense(f"{base}pooler.dense")}, "MLM head": mlm}
    # The classification heads are the same function as ours at inference. BertForSequenceClassification: pooler
    # (dense + tanh on [CLS]), dropout, classifier: ours, name for name. RobertaPreLayerNormForSequenceClassification
    # has no pooler; its head is [CLS] -> dropout -> dense -> tanh -> dropout -> out_proj, so its dense is our
    # pooler and out_proj our classifier. The one difference, a dropout on the [CLS] state before the dense, acts
    # only in training (logits agree; further finetuning in transformers drops out one more activation).
    if cfg.post_ln:
        heads["classifier"] = {"classifier": _dense("classifier")}
    else:
        heads["classifier"] = {"bert/pooler/dense": _dense("classifier.dense"),
                               "classifier": _dense("classifier.out_proj")}
    return encoder, heads


def _hf_names(table: dict) -> list[str]:
    return [n for params in table.values() for names in params.values() for n in names]


def _hf_shapes(template: dict, table: dict) -> dict[str, tuple]:
    """The shape each transformers tensor must have, from our params' shapes (a template of them)."""
    shapes = {}
    for module, params in table.items():
        for param, names in params.items():
            shape = list(template[module][param].shape)
            shape[1 if param == "w" else 0] //= len(names)
            shapes.update(dict.fromkeys(names, tuple(shape[::-1] if param == "w" else shape)))
    return shapes


def _from_hf(tensors: dict, table: dict) -> dict:
    return {module: {param: np.concatenate([(tensors[n].T if param == "w" else tensors[n]).astype(np.float32)
                                            for n in names], axis=1 if param == "w" else 0)
                     for param, names in params.items()}
            for module, params in table.items()}


def _to_hf(params: dict, table: dict) -> dict[str, np.ndarray]:
    out = {}
    for module, leaves in table.items():
        for param, names in leaves.items():
            parts = np.split(np.asarray(params[module][param], np.float32), len(names), axis=1 if param == "w" else 0)
            out.update({n: np.ascontiguousarray(p.T if param == "w" else p) for n, p in zip(names, parts)})
    return out


def _template(cfg: bert.BertConfig, num_labels: int) -> dict:
    """Our params' shapes (nothing computed): the MLM model's and the classifier's together."""
    import jax
    import jax.numpy as jnp

    key, tokens = jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32)
    mlm = jax.eval_shape(bert.mlm_model(cfg).init, key, tokens, tokens[:, :1])
    cls = jax.eval_shape(bert.classifier_model(cfg, num_labels).init, key, tokens, tokens, tokens > 0)
    return {**mlm, **cls}


# ----------------------------------------------------------------------------------------------------------
# Import

def read_tensors(hf_dir: str) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors (or of the shards its index lists); LayerNorm gamma/beta renamed."""
    single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        shards = _read_json(index).get("weight_map") or {}
        files = [os.path.join(hf_dir, f) for f in sorted(set(shards.values()))]
    elif any(os.path.isfile(os.path.join(hf_dir, f)) for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        bin_path = os.path.join(hf_dir, "pytorch_model.bin")
        raise UserError(
            f"{hf_dir} holds pytorch_model.bin, which cannot be read without torch; convert it to safetensors once "
            f"(needs torch): python -c \"import torch, safetensors.torch as s; d = torch.load({bin_path!r}, "
            f"map_location='cpu'); s.save_file({{k: v.contiguous().clone() for k, v in d.items()}}, "
            f"{single!r}, metadata={{'format': 'pt'}})\"")
    else:
        raise UserError(f"{hf_dir} has no model.safetensors")
    tensors = {}
    for path in files:
        try:
            tensors.update(_load_safetensors(path))
        except Exception as e:  # safetensors raises its own error types; a bad file is the user's input
            raise UserError(f"cannot read {path}: {first_line(e)}") from None
    return {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v
            for k, v in tensors.items()}


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """One safetensors file's tensors; bfloat16 ones (which safetensors.numpy cannot load) as float32."""
    from safetensors.numpy import load_file

    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    if all(v["dtype"] != "BF16" for v in entries.values()):
        return load_file(path)
    import ml_dtypes  # a dependency of jax

    raw, tensors = np.fromfile(path, np.uint8, offset=8 + size), {}
    for name, v in entries.items():
        if v["dtype"] != "BF16" and v["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name} has dtype {v['dtype']}, which this reader does not know")
        dtype = ml_dtypes.bfloat16 if v["dtype"] == "BF16" else SAFETENSORS_DTYPES[v["dtype"]]
        begin, end = v["data_offsets"]
        value = raw[begin:end].view(dtype).reshape(v["shape"])
        tensors[name] = value.astype(np.float32) if v["dtype"] == "BF16" else value
    return tensors


def load_hf(hf_dir: str) -> tuple[bert.BertConfig, dict, bytes, dict]:
    """A Hugging Face BERT folder -> (config, params, tokenizer.json bytes, info).

    params: {module: {name: float32 np.ndarray}} in model.py's names: the whole encoder, and each head (pooler,
    mlm_head, classifier) the checkpoint has. info: source, new_id (old id -> our id) and old_id (its inverse),
    heads and missing_heads (names), unused (tensor names), num_labels (of the classifier, or None), id2label (its
    label names by id, LABEL_<i> where config.json names none; None without a classifier) and problem_type.
    """
    cfg, raw = read_config(hf_dir)
    tokenizer_bytes, new_id = convert_tokenizer(hf_dir, cfg.vocab_size)
    tensors = read_tensors(hf_dir)
    prefix = LAYOUTS[raw["model_type"]][0]
    base = prefix if any(k.startswith(prefix) for k in tensors) else ""  # saved from BertModel: no prefix
    encoder, heads = _names(cfg, base)
    mlm_bias = heads["MLM head"]["mlm_head"]["output_bias"][0]
    decoder = mlm_bias.replace(".bias", ".decoder")
    if mlm_bias not in tensors and f"{decoder}.bias" in tensors:  # some checkpoints keep only the decoder's copy
        tensors[mlm_bias] = tensors.pop(f"{decoder}.bias")
    classifier_weight = heads["classifier"]["classifier"]["w"][0]
    num_labels = tensors[classifier_weight].shape[0] if classifier_weight in tensors else None

    present = [h for h, table in heads.items() if any(n in tensors for n in _hf_names(table))]
    table = {**encoder, **{m: p for h in present for m, p in heads[h].items()}}
    shapes = _hf_shapes(_template(cfg, num_labels or 2), table)
    position = encoder["bert/embeddings/position"]["embeddings"][0]
    shapes[position] = (shapes[position][0] + _position_offset(raw), cfg.hidden_size)
    for name in _hf_names(table):
        if name not in tensors:
            raise UserError(f"{hf_dir}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shapes[name]:
            raise UserError(f"{hf_dir}: tensor {name} has shape {tuple(tensors[name].shape)}, config.json "
                            f"implies {shapes[name]}")
    word = encoder["bert/embeddings/word"]["embeddings"][0]
    for tied, to in ((f"{decoder}.weight", word), (f"{decoder}.bias", mlm_bias)):
        if tied in tensors and to in tensors and not np.array_equal(tensors[tied], tensors[to]):
            raise UserError(f"{hf_dir}: {tied} differs from {to}; this model ties them")
    if "MLM head" in present and raw.get("tie_word_embeddings") is False and f"{decoder}.weight" not in tensors:
        raise UserError(f"{hf_dir}: config.json unties the decoder, but {decoder}.weight is missing")

    used = set(_hf_names(table)) | {f"{decoder}.weight", f"{decoder}.bias"} | {base + b for b in BUFFERS}
    unused = sorted(set(tensors) - used)
    stray = [n for n in unused if n.startswith((f"{base}embeddings.", f"{base}encoder."))]
    if stray:
        raise UserError(f"{hf_dir}: unexpected encoder tensor {stray[0]}" + (f" and {len(stray) - 1} more" if
                        len(stray) > 1 else "") + f" (config.json: {cfg.num_layers} layers, {raw['model_type']})")
    if unused:
        print(f"note: {hf_dir}: tensors not used: {', '.join(unused[:8])}"
              + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))

    tensors[position] = tensors[position][_position_offset(raw):]  # RoBERTa's rows in front: ours start at 0
    params = _from_hf(tensors, table)
    old_id = np.argsort(new_id)
    params["bert/embeddings/word"]["embeddings"] = params["bert/embeddings/word"]["embeddings"][old_id]
    if "mlm_head" in params:
        params["mlm_head"]["output_bias"] = params["mlm_head"]["output_bias"][old_id]
    given = raw.get("id2label") if isinstance(raw.get("id2label"), dict) else {}
    id2label = None if num_labels is None else [str(given.get(str(i), given.get(i, f"LABEL_{i}")))
                                                for i in range(num_labels)]
    info = {"source": hf_dir, "new_id": new_id, "old_id": old_id, "heads": present,
            "missing_heads": [h for h in heads if h not in present], "unused": unused, "num_labels": num_labels,
            "id2label": id2label, "problem_type": raw.get("problem_type")}
    return cfg, params, tokenizer_bytes, info


# ----------------------------------------------------------------------------------------------------------
# Export

def shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[list[str]]:
    """Tensor names in groups (in name order) whose safetensors files stay under max_bytes: data, plus the header's
    8 + up to 200 bytes a tensor. UserError if one tensor alone does not fit."""
    groups, size = [[]], 8
    for name in sorted(tensors):
        need = tensors[name].nbytes + 200
        if 8 + need > max_bytes:
            raise UserError(f"tensor {name} ({tensors[name].nbytes:,} bytes) does not fit in a shard of "
                            f"{max_bytes / 2**20:g} MiB; raise --shard_mb or export --dtype bf16")
        if size + need > max_bytes and groups[-1]:
            groups.append([])
            size = 8
        groups[-1].append(name)
        size += need
    return groups


def export_hf(ckpt_dir: str, out_dir: str, overwrite: bool = False, dtype: str = "fp32",
              shard_mb: float = 0.0) -> str:
    """A train.py checkpoint (a ckpt_* folder or an out_dir's newest: an MLM model) or a finetune.py model folder
    (<TASK>.model: a classifier, whose config.json gets id2label, label2id and problem_type) -> out_dir, a
    transformers folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json. Written under a
    temporary name, then renamed; an existing out_dir is refused, or with overwrite replaced if it holds only those
    files. Returns the transformers class name. dtype "bf16" stores the weights rounded to bfloat16 (half the
    bytes); shard_mb > 0 splits them into model-0000i-of-0000n.safetensors files of under shard_mb MiB each, listed
    by model.safetensors.index.json, transformers' sharded layout."""
    if dtype not in ("fp32", "bf16"):
        raise UserError(f"--dtype must be fp32 or bf16, got {dtype}")
    if not 0 <= shard_mb < float("inf"):
        raise UserError(f"--shard_mb must be >= 0 (0 = one file), got {shard_mb}")
    out_dir = out_dir.rstrip("/") or out_dir
    if os.path.exists(out_dir):
        if not overwrite:
            raise UserError(f"{out_dir} already exists; pass --overwrite to replace it")
        if not os.path.isdir(out_dir):
            raise UserError(f"{out_dir} is a file, not a folder hf.py --export wrote")
        other = sorted(f for f in os.listdir(out_dir) if f not in EXPORT_FILES + (SHARD_INDEX,)
                       and not SHARD_RE.match(f))
        if other:
            raise UserError(f"{out_dir} holds {other[0]}, which hf.py --export does not write; --overwrite replaces "
                            "only a folder it wrote")
    parent = os.path.dirname(os.path.abspath(out_dir))
    if not os.path.isdir(parent):
        raise UserError(f"cannot write {out_dir}: folder {parent} does not exist")
    common.check_writable_folder(parent)
    classifier = checkpoint.load_model_folder(ckpt_dir) if checkpoint.is_model_folder(ckpt_dir) else None
    if classifier is None:
        params, state = checkpoint.load_checkpoint(ckpt_dir)
        cfg, tokenizer_path, source = checkpoint.model_config(state), state["tokenizer_path"], state["path"]
    else:
        params, cfg, tokenizer_path, source = (classifier.params, classifier.cfg, classifier.tokenizer_path,
                                               classifier.path)
        if classifier.pooling != "cls":
            raise UserError(f"{source} was finetuned with --pooling {classifier.pooling}: no transformers "
                            "...ForSequenceClassification pools that way (they read [CLS]), so it has no exact "
                            "export; finetune with --pooling cls to export")
    tok = common.load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise UserError(f"{tokenizer_path} has {tok.get_vocab_size()} tokens, the model {cfg.vocab_size}")

    model_type = "bert" if cfg.post_ln else "roberta-prelayernorm"
    prefix, architecture = LAYOUTS[model_type]
    encoder, heads = _names(cfg, prefix)
    table = {**encoder, **heads["MLM head"]}
    if classifier is not None:
        architecture = CLASSIFIERS[model_type]
        table = {**encoder, **(heads["pooler"] if cfg.post_ln else {}), **heads["classifier"]}
    missing, extra = sorted(set(table) - set(params)), sorted(set(params) - set(table))
    if missing:
        raise UserError(f"checkpoint {source} lacks {', '.join(missing)} (made with an older model.py?)")
    if extra:
        raise UserError(f"checkpoint {source}: {', '.join(extra)} has no counterpart in {architecture}")
    tensors = _to_hf(params, table)
    config = {"architectures": [architecture], "model_type": model_type, "vocab_size": cfg.vocab_size,
              "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_layers,
              "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.intermediate_size, "hidden_act": "gelu",
              "hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout,
              "max_position_embeddings": cfg.max_position, "type_vocab_size": cfg.type_vocab_size,
              "layer_norm_eps": cfg.layer_norm_eps, "initializer_range": 0.02, "pad_token_id": common.PAD_ID,
              "position_embedding_type": "absolute", "tie_word_embeddings": True}
    if classifier is not None:
        names = classifier.labels or ["score"]  # regression: one output, the score
        config.update(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
                      problem_type="single_label_classification" if classifier.labels else "regression",
                      finetuning_task=classifier.task)
    if not cfg.post_ln:
        position = encoder["bert/embeddings/position"]["embeddings"][0]  # row 0: [PAD]'s position, never attended
        tensors[position] = np.concatenate([np.zeros((1, cfg.hidden_size), np.float32), tensors[position]])
        config.update(max_position_embeddings=cfg.max_position + 1, bos_token_id=common.CLS_ID,
                      eos_token_id=common.SEP_ID)
    tokenizer_text, tokenizer_config = for_transformers(tok, cfg.max_position)
    if dtype == "bf16":
        import ml_dtypes  # a dependency of jax

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
        config["torch_dtype"] = "bfloat16"
    groups = shards(tensors, int(shard_mb * 2**20)) if shard_mb else [sorted(tensors)]
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])

    from safetensors.numpy import save

    with common.atomic_dir(out_dir, f"{out_dir}.tmp.{os.getpid()}") as tmp:
        # Not safetensors' save_file: it makes the file mode 0600, where every other output follows the umask.
        for name, group in zip(names, groups):
            common.atomic_write_bytes(os.path.join(tmp, name), save({k: tensors[k] for k in group},
                                                                   metadata={"format": "pt"}))
        if len(groups) > 1:
            common.atomic_write_json(os.path.join(tmp, SHARD_INDEX), {
                "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
                "weight_map": {k: name for name, group in zip(names, groups) for k in group}})
        common.atomic_write_json(os.path.join(tmp, "config.json"), config)
        common.atomic_write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config)
        common.atomic_write_bytes(os.path.join(tmp, "tokenizer.json"), tokenizer_text.encode())
    return architecture


# ----------------------------------------------------------------------------------------------------------
# CLI

def main() -> None:
    p = common.ArgumentParser(__doc__)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--export", nargs=2, metavar=("CKPT_DIR", "OUT_DIR"),
                   help="write a train.py checkpoint (a ckpt_<step> folder, or an out_dir: its newest) as a new "
                        "transformers folder OUT_DIR: BertForMaskedLM for a post-LN model, "
                        "RobertaPreLayerNormForMaskedLM for a pre-LN one; or a finetune.py model folder "
                        "(<TASK>.model, --pooling cls) as BertForSequenceClassification or "
                        "RobertaPreLayerNormForSequenceClassification, with its label names")
    g.add_argument("--tokenizer", nargs=2, metavar=("HF_DIR", "OUT_JSON"),
                   help="write the tokenizer of a Hugging Face BERT folder with [PAD] [UNK] [CLS] [SEP] [MASK] at "
                        "ids 0..4, for data.py (then train.py --init_hf HF_DIR on that data)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT_JSON, or an OUT_DIR that --export wrote; without it they are refused")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="--export: store the weights as float32, or rounded to bfloat16 (half the bytes; "
                        "transformers and --init_hf load them as float32) (default: fp32)")
    p.add_argument("--shard_mb", type=common.non_negative_float, default=0.0,
                   help="--export: split the weights into files of under this many MiB (model-0000i-of-0000n."
                        "safetensors and model.safetensors.index.json, transformers' sharded layout); 0 = one "
                        "model.safetensors (default: 0)")
    args = p.parse_args()
    if args.export:
        architecture = export_hf(*args.export, overwrite=args.overwrite, dtype=args.dtype, shard_mb=args.shard_mb)
        auto = "AutoModelForSequenceClassification" if architecture in CLASSIFIERS.values() else "AutoModelForMaskedLM"
        print(f"wrote {args.export[1]}: {architecture} (load with transformers.{auto}.from_pretrained and "
              "AutoTokenizer.from_pretrained)")
        return
    hf_dir, out = args.tokenizer
    common.check_new_file(out, args.overwrite)
    cfg, _ = read_config(hf_dir)
    tokenizer_bytes, new_id = convert_tokenizer(hf_dir, cfg.vocab_size)
    common.atomic_write_bytes(out, tokenizer_bytes)
    print(f"wrote {out}: {len(new_id)} tokens, ids swapped (original -> ours): "
          + (", ".join(f"{old}->{new}" for old, new in enumerate(new_id) if old != new) or "none"))


if __name__ == "__main__":
    common.run_main(main)
