"""Finetune a pretrained BERT checkpoint on GLUE, score it with each task's official metric, and write the
prediction files the GLUE test server takes.

    python finetune.py --task sst2 --init out --glue_dir glue_data        # out: a train.py out_dir or ckpt_* folder
    python finetune.py --task all --init out --glue_dir glue_data --seeds 5  # every task with data, GLUE table
    python finetune.py --task rte --from_scratch --tokenizer tokenizer.json --model mini --glue_dir glue_data
    python finetune.py --task sst2 --init_hf bert-base-uncased --glue_dir glue_data  # a Hugging Face BERT folder

Without --glue_dir the data comes from the Hugging Face Hub (nyu-mll/glue). --glue_dir reads the original GLUE
TSV layout (download_glue_data.py): DIR/CoLA/train.tsv, DIR/MNLI/dev_matched.tsv, DIR/diagnostic/diagnostic.tsv...
Outputs in --out_dir: <TASK>.json (metrics per epoch and seed, medians, config), <TASK>.dev.tsv (index, prediction,
label per dev row; MNLI.dev_m.tsv, MNLI.dev_mm.tsv), submission/<TASK>.tsv (zip the submission folder to submit),
tb/ (tensorboardX scalars), <TASK>.model/ (the finetuned classifier, for predict.py and hf.py --export; not with
--no_save), and for --task all glue.json with the GLUE table. Prediction files and the model are the median seed's
best epoch; STS-B scores are clipped to [0, 5] in them and in the dev metrics. Outputs of an earlier run are
refused before anything trains, unless --overwrite.

    python finetune.py --task sst2 --init out --lr 1e-4,3e-4,1e-3 --seeds 3   # a grid: best median dev score wins
    python finetune.py --task sst2 --init_hf CLASSIFIER_DIR --eval_only         # a transformers classifier, as it is
"""
import dataclasses
import functools
import os
import shutil
import statistics
import time
from dataclasses import dataclass

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
from tokenizers import Tokenizer
from tqdm import tqdm

import checkpoint
import common
import glue
import hf
import model as bert
from common import CLS_ID, SEP_ID, UserError
from tokenizer import build_tokenizer

# BERT's grid is for BERT-base. Models narrower than 512 (tiny, mini) barely move at those rates: mini on SST-2
# at 3e-5 kept train loss at 0.65 after 564 steps, at 2e-4 it fell to 0.2 (README, results/sst2/).
NARROW_HIDDEN, NARROW_LR = 512, 2e-4

# ----------------------------------------------------------------------------------------------------------
# Tokenising and length bucketing


@dataclass
class Encoded:
    ids: np.ndarray  # [N, max_len] int32, zero ([PAD]) after each row's length
    types: np.ndarray  # [N, max_len] int8 token types (0 = sentence A, 1 = sentence B)
    lengths: np.ndarray  # [N] int32
    truncated: np.ndarray | None = None  # [N] bool: the row was longer than max_len and cut


def prepare_tokenizer(tok: Tokenizer, max_len: int) -> Tokenizer:
    """BERT inputs: '[CLS] A [SEP] B [SEP]' with types 0/1 (tokenizer.py's template), pairs cut longest-first to
    max_len, no padding."""
    tok.post_processor = build_tokenizer().post_processor
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.no_padding()
    return tok


def encode(tok: Tokenizer, examples: glue.Examples, max_len: int, chunk: int = 20000) -> Encoded:
    """Tokenise with a tokenizer made ready by prepare_tokenizer(tok, max_len)."""
    n = len(examples)
    ids = np.zeros((n, max_len), np.int32)
    types = np.zeros((n, max_len), np.int8)
    lengths = np.zeros(n, np.int32)
    truncated = np.zeros(n, bool)
    for start in tqdm(range(0, n, chunk), desc="tokenising", leave=False, disable=n <= chunk):
        a = examples.text_a[start:start + chunk]
        inputs = a if examples.text_b is None else list(zip(a, examples.text_b[start:start + chunk]))
        for i, e in enumerate(tok.encode_batch(inputs), start=start):
            lengths[i] = len(e.ids)
            truncated[i] = bool(e.overflowing)
            ids[i, :len(e.ids)] = e.ids
            types[i, :len(e.ids)] = e.type_ids
    return Encoded(ids, types, lengths, truncated)


def padded_length(length: int, multiple: int, max_len: int) -> int:
    """Round a batch's longest row up to a bucket boundary, so that few distinct shapes (jit compilations)
    exist: steps of `multiple`, coarsening to 1/8 of the length above 8*multiple (8: 8, 16, ..., 64, 80, 96,
    112, 128, 160, ...), which keeps padding under ~1/8 of the tokens at every length."""
    step = max(multiple, 2 ** (max(int(length) - 1, 1).bit_length() - 3))
    return min(max_len, -(-int(length) // step) * step)


def make_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None = None,
                 chunk_batches: int = 64) -> list[np.ndarray]:
    """Row indices per batch, grouping rows of similar length so that little compute goes to padding.

    Training (rng given): shuffle, sort by length within chunks of chunk_batches batches, then shuffle the
    batch order: batches stay random but nearly uniform in length. Evaluation (rng None): sort everything by
    length. Every row appears in exactly one batch; one batch can be short (collate fills it up).
    """
    n = len(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
    else:
        order = rng.permutation(n)
        span = chunk_batches * batch_size  # a multiple of batch_size: only the final chunk has a short batch
        order = np.concatenate([c[np.argsort(lengths[c], kind="stable")]
                                for c in np.split(order, range(span, n, span))]) if n else order
    batches = np.split(order, range(batch_size, n, batch_size)) if n else []
    return batches if rng is None else [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class Batch:
    tokens: np.ndarray  # [B, T] int32
    types: np.ndarray  # [B, T] int32
    mask: np.ndarray  # [B, T] bool, True on real tokens
    labels: np.ndarray  # [B] int32 or float32
    weights: np.ndarray  # [B] float32, 0 on filler rows


def collate(enc: Encoded, idx: np.ndarray, batch_size: int, multiple: int,
            labels: np.ndarray | None = None) -> Batch:
    """Pad the rows idx to a fixed batch_size (filler rows get weight 0) and a bucketed length."""
    n, max_len = len(idx), enc.ids.shape[1]
    T = padded_length(enc.lengths[idx].max(), multiple, max_len)
    tokens = np.zeros((batch_size, T), np.int32)
    types = np.zeros((batch_size, T), np.int32)
    lengths = np.full(batch_size, 2, np.int32)
    tokens[:n], types[:n], lengths[:n] = enc.ids[idx, :T], enc.types[idx, :T], enc.lengths[idx]
    tokens[n:, 0], tokens[n:, 1] = CLS_ID, SEP_ID  # filler rows: "[CLS] [SEP]", never an all-masked row
    mask = np.arange(T)[None, :] < lengths[:, None]  # [B, T]
    batch_labels = np.zeros(batch_size, np.int32 if labels is None else labels.dtype)
    if labels is not None:
        batch_labels[:n] = labels[idx]
    weights = (np.arange(batch_size) < n).astype(np.float32)
    return Batch(tokens, types, mask, batch_labels, weights)


def predict(logits_fn, params, enc: Encoded, batch_size: int, multiple: int) -> np.ndarray:
    """logits_fn(params, tokens, types, mask) -> [B, L] over all rows, returned in the original row order."""
    outputs = [(idx, logits_fn(params, b.tokens, b.types, b.mask))
               for idx in make_batches(enc.lengths, batch_size)
               for b in [collate(enc, idx, batch_size, multiple)]]  # dispatched asynchronously, gathered below
    if not outputs:
        return np.zeros((0, 0), np.float32)
    result = np.zeros((len(enc.lengths), outputs[0][1].shape[-1]), np.float32)
    for idx, logits in outputs:
        result[idx] = np.asarray(logits)[:len(idx)]
    return result


# ----------------------------------------------------------------------------------------------------------
# Model, loss, optimiser, train step


def task_loss(logits, labels, weights, regression: bool):
    """Weighted mean over real rows: squared error (regression) or cross-entropy. logits [B, L] float32."""
    if regression:
        per_row = jnp.square(logits[:, 0] - labels)
    else:
        per_row = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum(per_row * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def default_lr(task: glue.Task, cfg: bert.BertConfig) -> float:
    """The peak learning rate without --lr: the task's, or NARROW_LR for a model narrower than NARROW_HIDDEN."""
    return NARROW_LR if cfg.hidden_size < NARROW_HIDDEN else task.lr


def finetune_lr(step: int, lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then linear decay to 0 at total_steps (BERT's)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_finetune_step(model: hk.Transformed, optimizer: optax.GradientTransformation, regression: bool):
    """One jitted step: (params, opt_state, loss_scale, batch arrays, key, step, lr) -> updated state and loss."""

    def loss_fn(params, key, tokens, types, mask, labels, weights, loss_scale):
        logits = model.apply(params, key, tokens, types, mask, True)  # [B, L] float32
        loss = task_loss(logits, labels, weights, regression)
        return loss_scale.scale(loss), loss

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, loss_scale, tokens, types, mask, labels, weights, key, step_no, lr):
        key = jax.random.fold_in(key, step_no)
        grads, loss = jax.grad(loss_fn, has_aux=True)(params, key, tokens, types, mask, labels, weights, loss_scale)
        grads = loss_scale.unscale(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, jax.tree.map(lambda u: lr * u, updates))
        if isinstance(loss_scale, jmp.NoOpLossScale):
            return new_params, new_opt_state, loss_scale, loss
        finite = jmp.all_finite(grads)  # fp16: skip steps whose gradients overflowed, and adjust the scale
        params, opt_state = jmp.select_tree(finite, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, loss_scale.adjust(finite), loss

    return step


def make_logits_fn(cfg: bert.BertConfig, num_labels: int, pooling: str):
    """jitted (params, tokens, types, mask) -> logits [B, num_labels] float32, without dropout (for predict())."""
    model = bert.classifier_model(cfg, num_labels, pooling)
    return jax.jit(lambda params, tokens, types, mask: model.apply(params, None, tokens, types, mask, False))


@functools.lru_cache(maxsize=None)
def compiled_fns(cfg: bert.BertConfig, num_labels: int, regression: bool, weight_decay: float, precision: str,
                 pooling: str = "cls"):
    """(train step, logits fn, optimizer), shared by every seed and task with the same model and head, so that
    each batch shape compiles once per run (--task all: once for the seven two-label tasks). precision is part
    of the key because tracing reads the haiku policy that set_precision installed."""
    model = bert.classifier_model(cfg, num_labels, pooling)
    optimizer = bert.make_optimizer(weight_decay=weight_decay, b1=0.9, b2=0.999, eps=1e-6, clip_norm=1.0)
    return make_finetune_step(model, optimizer, regression), make_logits_fn(cfg, num_labels, pooling), optimizer


# ----------------------------------------------------------------------------------------------------------
# Where the weights come from: a train.py checkpoint (--init) or random (--from_scratch)


@dataclass
class Init:
    cfg: bert.BertConfig
    pretrained: dict | None  # haiku params {module: {name: array}} of the checkpoint; None = from scratch
    tokenizer: Tokenizer
    info: dict  # what the results JSON records about the start point
    # --init_hf of a ...ForSequenceClassification folder: its classifier params, label names (id2label) and
    # problem_type, for --eval_only (training starts a new classifier)
    head: dict | None = None


def load_init(*, init: str | None = None, init_hf: str | None = None, from_scratch: bool = False,
              tokenizer: str | None = None, model: str | None = None, dropout: float | None = None,
              eval_only: bool = False) -> Init:
    """The start point from the flags of the same names: a train.py checkpoint (init, by default DEFAULT_INIT
    if that folder exists), a Hugging Face BERT folder (init_hf) or random weights (from_scratch, with tokenizer
    and model). dropout: None keeps the checkpoint's. eval_only: no notes about a new classifier."""
    overrides = {} if dropout is None else {"dropout": dropout}
    if sum(map(bool, (init, init_hf, from_scratch))) > 1:
        raise UserError("give only one of --init DIR, --init_hf DIR and --from_scratch")
    if init_hf:
        return load_init_hf(init_hf, overrides, model, tokenizer, eval_only)
    if from_scratch:
        if not tokenizer or not model:
            raise UserError("--from_scratch needs --tokenizer FILE and --model PRESET (random weights)")
        tok = common.load_tokenizer(tokenizer)
        cfg = bert.make_config(model, tok.get_vocab_size(), **overrides)
        return Init(cfg, None, tok, {"from_scratch": True, "model": model, "tokenizer": tokenizer,
                                     "tokenizer_sha256": common.sha256_file(tokenizer)})
    init = init or (DEFAULT_INIT if os.path.isdir(DEFAULT_INIT) else None)  # train.py's default --out_dir
    if not init:
        raise UserError(f"no {DEFAULT_INIT}/ here (train.py's default output); give --init DIR (a train.py out_dir "
                        "or ckpt_<step> folder) or --init_hf DIR (a Hugging Face BERT folder) to finetune pretrained "
                        "weights, or --from_scratch --tokenizer FILE --model PRESET for random ones")
    if model:
        raise UserError("--model only applies with --from_scratch; the checkpoint fixes the model shape")
    params, state = checkpoint.load_checkpoint(init)
    ckpt, ckpt_tok_path = state["path"], state["tokenizer_path"]
    if not tokenizer and not os.path.isfile(ckpt_tok_path):
        raise UserError(f"checkpoint {ckpt} has no tokenizer.json; pass the one it was pretrained with: "
                        "--tokenizer FILE")
    tok_path = tokenizer or ckpt_tok_path
    tok = common.load_tokenizer(tok_path)
    cfg = dataclasses.replace(checkpoint.model_config(state), **overrides)
    if tok.get_vocab_size() != cfg.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens but checkpoint {ckpt} was trained "
                        f"with vocab_size {cfg.vocab_size}: use the tokenizer it was pretrained with")
    if tokenizer and os.path.isfile(ckpt_tok_path):
        if common.load_tokenizer(ckpt_tok_path).get_vocab() != tok.get_vocab():
            raise UserError(f"tokenizer {tok_path} has a different vocabulary from {ckpt_tok_path}, the one "
                            f"checkpoint {ckpt} was pretrained with")
    info = {"checkpoint": ckpt, "step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
            "tokenizer": tok_path, "tokenizer_sha256": common.sha256_file(tok_path)}
    return Init(cfg, params, tok, info)


def load_init_hf(hf_dir: str, overrides: dict, model: str | None, tokenizer: str | None,
                 eval_only: bool = False) -> Init:
    """--init_hf: a Hugging Face BERT folder with its tokenizer converted by hf.py; every task trains a new
    classifier (the folder's own, if any, is kept in Init.head for --eval_only, which scores it as it is)."""
    if model or tokenizer:
        raise UserError("--init_hf takes the model and its tokenizer from the folder; drop --model and --tokenizer")
    cfg, params, tokenizer_bytes, info = hf.load_hf(hf_dir)
    head = None
    if "classifier" in params:
        head = {"classifier": params.pop("classifier"), "labels": info["id2label"],
                "problem_type": info["problem_type"]}
    if not eval_only:
        if head is not None:
            print(f"note: {hf_dir}: its classifier ({info['num_labels']} labels) is not used (--eval_only scores it)")
        fresh = ["bert/pooler/dense"] * ("bert/pooler/dense" not in params) + ["classifier"]
        print(f"note: {hf_dir}: initialised fresh for each task: {', '.join(fresh)}")
    summary = {"init_hf": info["source"], "tokenizer_sha256": common.sha256_bytes(tokenizer_bytes)}
    return Init(dataclasses.replace(cfg, **overrides), params, Tokenizer.from_str(tokenizer_bytes.decode()), summary,
                head)


def eval_only_params(task: glue.Task, init: Init) -> dict:
    """--eval_only: the --init_hf folder's whole classifier as it is, checked against the task (labels, count)."""
    source = init.info.get("init_hf")
    if source is None or init.head is None:
        raise UserError("--eval_only scores a finetuned classifier as it is: give --init_hf DIR of a transformers "
                        "...ForSequenceClassification folder (for example one that hf.py --export wrote)")
    names, problem = init.head["labels"], init.head["problem_type"]
    if len(names) != task.num_labels:
        raise UserError(f"{source}: its classifier has {len(names)} label(s) ({', '.join(names)}), {task.name} has "
                        f"{task.num_labels}: a model of another task")
    if problem is not None and (problem == "regression") != (task.labels is None):
        raise UserError(f"{source}: its problem_type is {problem!r}, {task.name} is "
                        + ("a regression task" if task.labels is None else "a classification task"))
    generic = names == [f"LABEL_{i}" for i in range(len(names))]
    if task.hf_label_names and not generic and names != list(task.hf_label_names):
        raise UserError(f"{source}: its labels ({', '.join(names)}) are not {task.name}'s "
                        f"({', '.join(task.hf_label_names)}): a model of another task")
    if task.hf_label_names and generic:
        print(f"note: {source}: labels {', '.join(names)} taken to be {task.name}'s "
              f"{', '.join(task.hf_label_names)}, in that order")
    tokens = jnp.zeros((1, 2), jnp.int32)
    fresh = _jitted_init(init.cfg, task.num_labels)(jax.random.PRNGKey(0), tokens, tokens, jnp.ones((1, 2), bool))
    everything = {f"{m}/{n}" for m, leaves in fresh.items() for n in leaves}
    merged, _ = checkpoint.merge_params(fresh, {**init.pretrained, "classifier": init.head["classifier"]}, source,
                                        everything, notes=False)
    return jax.tree.map(jnp.asarray, merged)


@functools.lru_cache(maxsize=None)
def _jitted_init(cfg: bert.BertConfig, num_labels: int):
    return jax.jit(bert.classifier_model(cfg, num_labels).init)  # compiled once: faster than op by op


def init_params(cfg: bert.BertConfig, num_labels: int, pretrained: dict | None, key) -> tuple[dict, list[str]]:
    """Classifier params: encoder from the checkpoint, new head (pooler, classifier) from key.

    -> (params, names of freshly initialised params). An encoder param the checkpoint lacks, or one whose shape
    differs, is an error: finetuning must never quietly start from random encoder weights.
    """
    tokens = jnp.zeros((1, 2), jnp.int32)
    params = _jitted_init(cfg, num_labels)(key, tokens, tokens, jnp.ones((1, 2), bool))
    if pretrained is None:
        return params, [f"{m}/{n}" for m, leaves in params.items() for n in leaves]
    mlm = jax.eval_shape(bert.mlm_model(cfg).init, key, tokens, jnp.zeros((1, 1), jnp.int32))
    encoder = {f"{m}/{n}" for m, leaves in mlm.items() for n in leaves}
    merged, fresh = checkpoint.merge_params(params, pretrained, "the checkpoint", encoder, notes=False)
    return jax.tree.map(jnp.asarray, merged), fresh


# ----------------------------------------------------------------------------------------------------------
# Finetuning one task


@dataclass
class TaskData:
    train: Encoded
    train_labels: np.ndarray
    dev: dict  # suffix -> (Encoded, labels, row ids)
    test: dict  # submission file -> (Encoded, row ids)
    info: dict


@dataclass(frozen=True)
class Recipe:
    """How every seed of every task trains and is scored (the flags of the same names)."""
    epochs: int
    batch_size: int
    max_len: int
    warmup: float  # fraction of the steps
    weight_decay: float
    precision: str
    eval_batch_size: int
    pad_multiple: int
    log_every: int
    pooling: str


def evaluate(task: glue.Task, logits_fn, params, dev: dict, recipe: Recipe):
    """dev: {metric suffix: (Encoded, labels, row ids)} -> (the task's official metrics on each dev set,
    {suffix: model outputs})."""
    metrics, outputs = {}, {}
    for suffix, (enc, labels, _) in dev.items():
        outputs[suffix] = predict(logits_fn, params, enc, recipe.eval_batch_size, recipe.pad_multiple)
        metrics.update(glue.task_metrics(task, outputs[suffix], labels, suffix))
    return metrics, outputs


def train_epoch(step_fn, state: tuple, enc: Encoded, labels: np.ndarray, batches: list, *, batch_size: int,
                multiple: int, key, step: int, lr_fn, log_every: int = 0, desc: str = "", on_log=None):
    """One pass over batches (index arrays from make_batches), each padded by collate(batch_size, multiple).
    state = (params, opt_state, loss_scale); lr_fn(step) -> learning rate. -> (state, step, mean loss).
    on_log(step, recent mean loss) every log_every steps (0: never)."""
    losses = []
    bar = tqdm(batches, desc=desc, unit="batch", leave=False)
    for idx in bar:
        b = collate(enc, idx, batch_size, multiple, labels)
        *state, loss = step_fn(*state, b.tokens, b.types, b.mask, b.labels, b.weights, key, step,
                               np.float32(lr_fn(step)))
        losses.append(loss)
        step += 1
        if log_every and step % log_every == 0:
            recent = float(jnp.mean(jnp.stack(losses[-log_every:])))
            bar.set_postfix(loss=f"{recent:.4f}", refresh=False)
            if on_log is not None:
                on_log(step, recent)
    return tuple(state), step, float(jnp.mean(jnp.stack(losses)))


def check_finite(where: str, values: dict) -> None:
    """Stop before any result is written when a run diverged: {name: array or number} must all be finite."""
    bad = [name for name, v in values.items() if not np.all(np.isfinite(v))]
    if bad:
        raise UserError(f"{where}: {' and '.join(bad)} not finite, so no result is written; try a lower --lr")


def train_seed(task: glue.Task, init: Init, data: TaskData, recipe: Recipe, seed: int, lr_fn, log_dir: str,
               keep_params: bool = False) -> dict:
    """Finetune from init with one seed; evaluate on dev after each epoch; predict test with the best epoch.
    keep_params: the result holds that epoch's params too (host arrays), for saving."""
    from tensorboardX import SummaryWriter

    step_fn, logits_fn, optimizer = compiled_fns(init.cfg, task.num_labels, task.labels is None,
                                                 recipe.weight_decay, recipe.precision, recipe.pooling)
    params, fresh = init_params(init.cfg, task.num_labels, init.pretrained, jax.random.PRNGKey(seed))
    loss_scale = jmp.DynamicLossScale(jnp.float32(2 ** 15)) if recipe.precision == "fp16" else jmp.NoOpLossScale()
    state = (params, optimizer.init(params), loss_scale)
    rng, dropout_key = np.random.default_rng(seed), jax.random.PRNGKey(seed + 1_000_003)
    with common.writing(log_dir):
        writer = SummaryWriter(log_dir)

    def on_log(step, loss):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", lr_fn(step), step)

    epochs, best, best_record, step = [], None, None, 0
    try:
        for epoch in range(1, recipe.epochs + 1):
            start = time.time()
            batches = make_batches(data.train.lengths, recipe.batch_size, rng)
            state, step, train_loss = train_epoch(
                step_fn, state, data.train, data.train_labels, batches, batch_size=recipe.batch_size,
                multiple=recipe.pad_multiple, key=dropout_key, step=step, lr_fn=lr_fn, log_every=recipe.log_every,
                desc=f"{task.name} seed {seed} epoch {epoch}", on_log=on_log)
            train_seconds = time.time() - start
            metrics, dev_outputs = evaluate(task, logits_fn, state[0], data.dev, recipe)
            check_finite(f"{task.name} seed {seed} epoch {epoch}",
                         {"train loss": train_loss, **{f"dev{s} outputs": o for s, o in dev_outputs.items()}})
            score = glue.task_score(metrics)
            for name, value in metrics.items():
                writer.add_scalar(f"dev/{name}", value, step)
            record = {"epoch": epoch, "steps": step, "train_loss": train_loss, "dev": metrics, "score": score,
                      "train_seconds": train_seconds, "seconds": time.time() - start,
                      "train_examples_per_s": len(data.train.lengths) / train_seconds}
            epochs.append(record)
            print(f"{task.name} seed {seed} epoch {epoch}: train loss {train_loss:.4f}, dev "
                  + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items())
                  + f" ({record['seconds']:.0f} s)", flush=True)
            if best_record is None or score > best_record["score"] or not np.isfinite(best_record["score"]):
                best, best_record = jax.tree.map(np.array, state[0]), record  # a host copy: params get donated
                best_dev = dev_outputs
    finally:
        with common.writing(log_dir):
            writer.close()
    test_outputs = {f: predict(logits_fn, best, enc, recipe.eval_batch_size, recipe.pad_multiple)
                    for f, (enc, _) in data.test.items()}
    check_finite(f"{task.name} seed {seed}", {f"{f} outputs": o for f, o in test_outputs.items()})
    return {"seed": seed, "epochs": epochs, "best_epoch": best_record["epoch"], "best": best_record["dev"],
            "best_score": best_record["score"], "new_params": fresh, "test_outputs": test_outputs,
            "dev_outputs": best_dev, **({"params": best} if keep_params else {})}


def score_as_is(task: glue.Task, init: Init, data: TaskData, recipe: Recipe) -> dict:
    """--eval_only: the --init_hf folder's own classifier scored on dev and run on test, without training; the
    same result fields as train_seed (one 'epoch' 0)."""
    params = eval_only_params(task, init)
    logits_fn = make_logits_fn(init.cfg, task.num_labels, recipe.pooling)
    start = time.time()
    metrics, dev_outputs = evaluate(task, logits_fn, params, data.dev, recipe)
    record = {"epoch": 0, "steps": 0, "dev": metrics, "score": glue.task_score(metrics),
              "seconds": time.time() - start}
    print(f"{task.name} as it is (--eval_only): dev " + ", ".join(f"{k} {100 * v:.2f}" for k, v in metrics.items()),
          flush=True)
    test_outputs = {f: predict(logits_fn, params, enc, recipe.eval_batch_size, recipe.pad_multiple)
                    for f, (enc, _) in data.test.items()}
    return {"seed": None, "epochs": [record], "best_epoch": 0, "best": metrics, "best_score": record["score"],
            "new_params": [], "test_outputs": test_outputs, "dev_outputs": dev_outputs,
            "params": jax.tree.map(np.asarray, params)}


def median_run(runs: list[dict]) -> dict:
    """The median seed's run, by its best dev score (the upper one of two middles)."""
    return sorted(runs, key=lambda r: (r["best_score"], r["seed"]))[len(runs) // 2]


def median_score(runs: list[dict]) -> float:
    return statistics.median(r["best_score"] for r in runs)


def run_summary(runs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("test_outputs", "dev_outputs", "params")} for r in runs]


def run_task(task: glue.Task, init: Init, data: TaskData, recipe: Recipe, lrs: list[float], seeds: list[int],
             out_dir: str, max_train_examples: int = 0, save: bool = True, eval_only: bool = False) -> dict:
    """Every seed of one task at each learning rate of lrs -> the results dict (also written to
    out_dir/<TASK>.json), the dev prediction and submission files, and with save the model folder <TASK>.model.

    Several rates (a grid): each runs every seed; the rate whose median dev score is highest wins (the first
    listed of equals), so it is chosen on dev and its dev numbers are optimistic. Every file comes from one run:
    the winning rate's median seed, at its best epoch. eval_only: no training; the --init_hf folder's classifier
    is scored as it is (lrs and seeds unused). max_train_examples: only recorded (data holds the rows already cut).
    """
    start = time.time()
    total_steps = 0 if eval_only else -(-len(data.train.lengths) // recipe.batch_size) * recipe.epochs
    grid = []  # (lr, runs, the median run) per rate
    if eval_only:
        runs = [score_as_is(task, init, data, recipe)]
        grid.append((None, runs, runs[0]))
    for lr in [] if eval_only else lrs:
        lr_fn = functools.partial(finetune_lr, lr=lr, total_steps=total_steps,
                                  warmup_steps=round(recipe.warmup * total_steps))
        log_dir = os.path.join(out_dir, "tb", task.name, *([f"lr{lr:g}"] if len(lrs) > 1 else []))
        runs = [train_seed(task, init, data, recipe, seed, lr_fn, os.path.join(log_dir, f"seed{seed}"), save)
                for seed in seeds]
        chosen = median_run(runs)
        for r in runs:
            if r is not chosen:
                r.pop("params", None)  # only the median seed's weights can be saved
        grid.append((lr, runs, chosen))
        if len(lrs) > 1:
            print(f"{task.name} lr {lr:g}: median dev score over {len(runs)} seed(s) "
                  f"{100 * median_score(runs):.2f}", flush=True)
    scores = [median_score(runs) for _, runs, _ in grid]
    win = max(range(len(grid)), key=lambda i: (scores[i] if np.isfinite(scores[i]) else -np.inf, -i))
    lr, runs, chosen = grid[win]
    written = glue.write_submissions(task, chosen["test_outputs"], {f: index for f, (_, index) in data.test.items()},
                                     os.path.join(out_dir, "submission"))
    dev_files = [os.path.join(out_dir, f"{task.name}.dev{suffix}.tsv") for suffix in data.dev]
    for path, (suffix, (_, labels, index)) in zip(dev_files, data.dev.items()):
        glue.write_predictions(path, task, index, chosen["dev_outputs"][suffix], labels)
    median = {k: statistics.median(r["best"][k] for r in runs) for k in runs[0]["best"]}
    result = {
        "task": task.name, "metrics": list(median), "median": median, "median_score": scores[win],
        "seeds": run_summary(runs),
        "submission_seed": chosen["seed"], "submission_files": written, "dev_prediction_files": dev_files,
        "config": {"lr": lr, "epochs": recipe.epochs, "batch_size": recipe.batch_size, "max_len": recipe.max_len,
                   "warmup": recipe.warmup, "weight_decay": recipe.weight_decay, "precision": recipe.precision,
                   "seeds": [r["seed"] for r in runs], "steps": total_steps, "pad_multiple": recipe.pad_multiple,
                   "pooling": recipe.pooling,
                   "max_train_examples": max_train_examples, "model": dataclasses.asdict(init.cfg)},
        "init": init.info, "data": data.info, "wall_seconds": time.time() - start,
    }
    if eval_only:
        result["config"].update(eval_only=True, epochs=0)
    if len(grid) > 1:
        result["lr_grid"] = {
            "chosen_on": "dev: the rate with the highest median dev score over the seeds; its dev numbers are "
                         "therefore optimistic", "lr": lr,
            "rates": [{"lr": g_lr, "median_score": score, "median": {k: statistics.median(r["best"][k] for r in g_runs)
                                                                      for k in g_runs[0]["best"]},
                       "median_seed": g_chosen["seed"], "seeds": run_summary(g_runs)}
                      for (g_lr, g_runs, g_chosen), score in zip(grid, scores)]}
    saved = []
    if save:
        saved = [os.path.join(out_dir, f"{task.name}.model")]
        clean = Tokenizer.from_str(init.tokenizer.to_str())
        clean.no_truncation()  # as tokenizer.py writes them: prepare_tokenizer sets the rest again when loading
        checkpoint.save_model_folder(saved[0], chosen["params"], {
            "task": task.name, "labels": None if task.labels is None else list(task.hf_label_names),
            "pooling": recipe.pooling, "max_len": recipe.max_len, "precision": recipe.precision,
            "config": dataclasses.asdict(init.cfg), "seed": chosen["seed"], "epoch": chosen["best_epoch"],
            "lr": lr, "dev": chosen["best"], "init": init.info}, clean.to_str().encode())
        result["model_folder"] = saved[0]
    common.atomic_write_json(os.path.join(out_dir, f"{task.name}.json"), result)
    print(f"{task.name}: " + (f"lr {lr:g} chosen on dev from {', '.join(f'{x:g}' for x in lrs)}; " if len(grid) > 1
                              else "") + f"median over {len(runs)} seed(s): "
          + ", ".join(f"{k} {100 * v:.2f}" for k, v in median.items())
          + f"; wrote {os.path.join(out_dir, task.name + '.json')}, " + ", ".join(dev_files + written + saved),
          flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# CLI


DEFAULT_INIT = "out"


def lr_list(text: str) -> list[float]:
    """--lr: one peak learning rate, or a comma-separated grid of them."""
    rates = [common.positive_float(x) for x in text.split(",")]
    if len(set(rates)) != len(rates):
        raise argparse.ArgumentTypeError(f"lists a rate twice: {text!r}")
    return rates


def parse_args(argv=None):
    p = common.ArgumentParser(__doc__)
    p.add_argument("--task", required=True, type=glue.task_key, choices=[*glue.TASKS, "all"],
                   help="GLUE task, or 'all' for every task with train and dev data plus a GLUE table "
                        "(AX, the diagnostic set, is predicted with the MNLI model)")
    p.add_argument("--glue_dir", help="read the GLUE TSV files from this folder (download_glue_data.py layout: "
                                      "DIR/SST-2/train.tsv, ...); default: the Hub dataset nyu-mll/glue")
    p.add_argument("--holdout", type=common.float_in(0, 1, open_high=True), default=0.0,
                   help="for a task whose --glue_dir copy has no dev file: score on this fraction of its training "
                        "rows, held out from training (a fixed draw, the same for every seed); results then say "
                        "so (default: 0 = a missing dev file is an error)")
    p.add_argument("--skip_bad_rows", action="store_true",
                   help="skip (and count) rows with the wrong number of fields instead of stopping")
    g = p.add_argument_group("start point")
    g.add_argument("--init", help="pretrained weights: a train.py out_dir (its newest checkpoint) or a "
                                  "ckpt_<step> folder; its tokenizer.json and model config are used (default: "
                                  f"{DEFAULT_INIT}, train.py's default --out_dir, unless --init_hf/--from_scratch)")
    g.add_argument("--init_hf", metavar="DIR",
                   help="pretrained weights of a Hugging Face BERT folder (config.json, model.safetensors, "
                        "tokenizer.json or vocab.txt; see hf.py), with its tokenizer converted")
    g.add_argument("--from_scratch", action="store_true",
                   help="random weights instead of --init (a baseline); needs --tokenizer and --model")
    g.add_argument("--tokenizer", help="tokenizer.json: with --from_scratch, or for a checkpoint that lacks one")
    g.add_argument("--model", choices=list(bert.PRESETS), help="model preset for --from_scratch")
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=lr_list, help=f"peak learning rate (default: {NARROW_LR:g} for models with hidden size "
                   f"under {NARROW_HIDDEN}, such as tiny and mini; else per task, "
                   + ", ".join(f"{t.name} {t.lr:g}" for t in glue.TASKS.values()) + "); or a grid, e.g. "
                   "1e-4,3e-4,1e-3: every rate runs every seed, the rate with the best median dev score wins (chosen "
                   "on dev) and every output file comes from its median seed")
    g.add_argument("--epochs", type=common.positive_int, default=3, help="epochs over the training set (default: 3)")
    g.add_argument("--batch_size", type=common.positive_int, default=32, help="training batch size (default: 32)")
    g.add_argument("--max_len", type=common.int_in(8), default=128,
                   help="tokens per example incl. [CLS]/[SEP]; pairs are cut longest-first (default: 128)")
    g.add_argument("--warmup", type=common.float_in(0, 1, open_high=True), default=0.1,
                   help="fraction of steps of linear warmup, then linear decay to 0 (default: 0.1)")
    g.add_argument("--weight_decay", type=common.non_negative_float, default=0.01,
                   help="AdamW weight decay (default: 0.01)")
    g.add_argument("--dropout", type=common.float_in(0, 1, open_high=True),
                   help="dropout rate (default: the checkpoint's config)")
    g.add_argument("--pooling", choices=list(bert.POOLINGS), default="cls",
                   help="what the classifier reads: the [CLS] position (BERT's), or the mean of the real tokens' "
                        "final states, which suits starts whose pretraining never showed [CLS] (default: cls)")
    g.add_argument("--precision", choices=list(bert.PRECISIONS),
                   help="compute dtype as in train.py; params stay fp32; fp16 adds dynamic loss scaling "
                        "(default: bf16 on GPU/TPU, fp32 on CPU)")
    g.add_argument("--seeds", type=common.positive_int, default=1,
                   help="finetune this many times with different seeds and report the median (default: 1)")
    g.add_argument("--seed", type=common.seed, default=0,
                   help=f"first seed; the runs use seed, seed+1, ..., up to {common.MAX_SEED} (default: 0)")
    g.add_argument("--max_train_examples", type=common.non_negative_int, default=0,
                   help="use only the first N training rows, for quick runs (default: 0 = all)")
    g.add_argument("--eval_only", action="store_true",
                   help="no training: score the classifier of an --init_hf folder (a transformers "
                        "...ForSequenceClassification, e.g. from hf.py --export) as it is, and write the same files")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval_batch_size", type=common.positive_int, default=128,
                   help="batch size for dev/test (default: 128)")
    g.add_argument("--pad_multiple", type=common.positive_int, default=8,
                   help="batches are padded to a multiple of this length (coarser above 8x it): fewer distinct "
                        "shapes, i.e. jit compilations, against less padding (default: 8)")
    g.add_argument("--log_every", type=common.positive_int, default=50, help="steps between loss logs (default: 50)")
    g.add_argument("--out_dir", default="out/glue",
                   help="results JSON, dev predictions, submission/ files, the model folder <TASK>.model and tb/ "
                        "logs go here (default: out/glue)")
    g.add_argument("--no_save", action="store_true",
                   help="do not save the model folder <TASK>.model (the median seed's best epoch: params, config, "
                        "tokenizer, labels, pooling; what predict.py and hf.py --export read), e.g. for sweeps")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the outputs of an earlier run in --out_dir (its tb/<TASK> logs are deleted before "
                        "training); without it they are refused before anything is trained")
    args = p.parse_args(argv)
    if args.seed + args.seeds - 1 > common.MAX_SEED:
        p.error(f"--seed {args.seed} with --seeds {args.seeds} runs seeds up to {args.seed + args.seeds - 1}, "
                f"above {common.MAX_SEED}")
    args.precision = args.precision or bert.default_precision()
    return args


def load_for_run(task: glue.Task, tok: Tokenizer, glue_dir: str | None, required: bool, *, holdout: float,
                 skip_bad_rows: bool, max_train_examples: int, max_len: int) -> TaskData | None:
    """Read and tokenise a task. required=False (--task all): a task lacking train or dev data is skipped
    (None) and one lacking test data runs without writing its submission file, each with a note."""
    if not required and glue_dir is not None:
        missing = glue.missing_files(glue_dir, [task.train] + ([] if holdout else list(task.dev)))
        if missing:
            print(f"note: skipping {task.name}: missing " + ", ".join(missing))
            return None
    train_set, dev, test = glue.load_task(task, glue_dir, skip_bad_rows, required, holdout)
    if max_train_examples:
        train_set = train_set.head(max_train_examples)
    describe = lambda e: {"rows": len(e), "source": e.source, "skipped_rows": e.skipped}  # noqa: E731
    info = {"train": describe(train_set), "dev": {s or "dev": describe(e) for s, e in dev.items()},
            "test": {f: describe(e) for f, e in test.items()}}
    return TaskData(encode(tok, train_set, max_len), train_set.labels,
                    {s: (encode(tok, e, max_len), e.labels, e.index) for s, e in dev.items()},
                    {f: (encode(tok, e, max_len), e.index) for f, e in test.items()}, info)


def outputs_of(task: glue.Task, data: TaskData, out_dir: str, save: bool) -> tuple[list, list, list]:
    """What run_task writes for a task: (files, the model folder if save, its tb/ log folder)."""
    files = ([os.path.join(out_dir, f"{task.name}.json")]
             + [os.path.join(out_dir, f"{task.name}.dev{suffix}.tsv") for suffix in data.dev]
             + [os.path.join(out_dir, "submission", file) for file in data.test])
    return files, [os.path.join(out_dir, f"{task.name}.model")] * save, [os.path.join(out_dir, "tb", task.name)]


def check_outputs(files: list[str], model_dirs: list[str], log_dirs: list[str], overwrite: bool) -> None:
    """The existing-output rule for every output of the run, checked before anything is trained: an earlier
    run's outputs are refused unless overwrite; with it, the tb/ logs of these tasks are deleted now (new event
    files would mix with the old), the rest is replaced when the new is written."""
    existing = [p for p in files + model_dirs + log_dirs if os.path.lexists(p)]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more output(s) of an earlier run)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} already exists{more}; pass --overwrite to replace them, or choose another "
                        "--out_dir")
    for path in files:
        if os.path.isdir(path):
            raise UserError(f"cannot write {path}: it is a folder")
    for path in model_dirs:
        checkpoint.check_model_folder_target(path, overwrite=True)
    for path in log_dirs:
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keys = list(glue.TASKS) if args.task == "all" else [args.task]
    if args.eval_only:
        if args.task == "all" or not args.init_hf:
            raise UserError("--eval_only scores one task's classifier as it is: give --task TASK and --init_hf DIR "
                            "(a transformers ...ForSequenceClassification folder)")
        if args.lr is not None or args.seeds != 1 or args.pooling != "cls":
            raise UserError("--eval_only trains nothing: drop --lr and --seeds; and transformers' classifiers read "
                            "[CLS] (no --pooling mean)")
    init = load_init(init=args.init, init_hf=args.init_hf, from_scratch=args.from_scratch, tokenizer=args.tokenizer,
                     model=args.model, dropout=args.dropout, eval_only=args.eval_only)
    if args.eval_only:
        eval_only_params(glue.TASKS[args.task], init)  # a classifier of another task stops the run before the data
    if args.max_len > init.cfg.max_position:
        raise UserError(f"--max_len {args.max_len} exceeds the model's max_position {init.cfg.max_position}")
    if args.glue_dir is not None and not os.path.isdir(args.glue_dir):
        raise UserError(f"--glue_dir {args.glue_dir} is not a folder")
    prepare_tokenizer(init.tokenizer, args.max_len)
    bert.set_precision(args.precision)
    common.check_writable_folder(args.out_dir)
    common.make_folder(args.out_dir)
    # Read every task before training any, so that bad data stops the run at once, not hours in.
    loaded = {key: load_for_run(glue.TASKS[key], init.tokenizer, args.glue_dir, required=args.task != "all",
                                holdout=args.holdout, skip_bad_rows=args.skip_bad_rows,
                                max_train_examples=args.max_train_examples, max_len=args.max_len) for key in keys}
    loaded = {key: data for key, data in loaded.items() if data is not None}
    planned = [outputs_of(glue.TASKS[key], data, args.out_dir, not args.no_save) for key, data in loaded.items()]
    files, model_dirs, log_dirs = ([p for kind in planned for p in kind[i]] for i in range(3))
    check_outputs(files + [os.path.join(args.out_dir, "glue.json")] * (args.task == "all"), model_dirs, log_dirs,
                  args.overwrite)
    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    seeds = [args.seed + i for i in range(args.seeds)]
    results = {key: run_task(glue.TASKS[key], init, data, recipe, args.lr or [default_lr(glue.TASKS[key], init.cfg)],
                             seeds, args.out_dir, args.max_train_examples, save=not args.no_save,
                             eval_only=args.eval_only)
               for key, data in loaded.items()}
    if args.task == "all":
        if not results:
            raise UserError(f"no GLUE task has both train and dev data under {args.glue_dir}")
        medians = {k: r["median"] for k, r in results.items()}
        table = glue.glue_table(medians)
        note = "" if len(medians) == len(glue.TASKS) else \
            f" ({len(medians)} of {len(glue.TASKS)} tasks: not comparable to the leaderboard's score)"
        print(f"\nGLUE dev scores, median of {args.seeds} seed(s){note}:\n{table}")
        common.atomic_write_json(os.path.join(args.out_dir, "glue.json"),
                                 {"medians": medians, "score": glue.glue_score(medians), "tasks": list(medians),
                                  "table": table, "seeds": args.seeds})
    return results


if __name__ == "__main__":
    common.run_main(main)
