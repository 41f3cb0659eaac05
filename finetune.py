"""Finetune a pretrained BERT checkpoint on GLUE, score it with each task's official metric, and write the
prediction files the GLUE test server takes.

    python finetune.py --task sst2 --init out --glue_dir glue_data        # out: a train.py out_dir or ckpt_* folder
    python finetune.py --task all --init out --glue_dir glue_data --seeds 5  # every task with data, GLUE table
    python finetune.py --task rte --from_scratch --tokenizer tokenizer.json --model mini --glue_dir glue_data
    python finetune.py --task sst2 --init_hf bert-base-uncased --glue_dir glue_data  # a Hugging Face BERT folder

Without --glue_dir the data comes from the Hugging Face Hub (nyu-mll/glue). --glue_dir reads the original GLUE
TSV layout (download_glue_data.py): DIR/CoLA/train.tsv, DIR/MNLI/dev_matched.tsv, DIR/diagnostic/diagnostic.tsv...
Outputs in --out_dir: <TASK>.json (metrics per epoch and seed, medians, config), submission/<TASK>.tsv (zip the
submission folder to submit), tb/ (tensorboardX scalars), and for --task all glue.json with the GLUE table.
"""
import argparse
import dataclasses
import functools
import os
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

import common
import corpus
import hf
import model as bert
import train
from common import CLS_ID, SEP_ID, UserError, first_line

# ----------------------------------------------------------------------------------------------------------
# The GLUE tasks


@dataclass(frozen=True)
class Split:
    file: str  # path under --glue_dir
    hf: tuple[str, str]  # (config, split) of the Hub dataset nyu-mll/glue
    suffix: str = ""  # dev: appended to metric names when a task has two dev sets (MNLI: acc_m, acc_mm)
    submission: str = ""  # test: the file name the GLUE server expects


@dataclass(frozen=True)
class Task:
    name: str  # GLUE's spelling, as in the leaderboard
    labels: tuple[str, ...] | None  # label strings in the TSV files, index = class id; None = regression
    metrics: tuple[str, ...]  # the official metrics, leaderboard order
    lr: float  # default peak learning rate
    columns: tuple[str, ...]  # TSV header names of sentence A (and B)
    label_column: str
    hf_columns: tuple[str, ...]  # the same sentences in the Hub dataset
    hf_label_names: tuple[str, ...] | None  # the Hub's ClassLabel names, which must line up with labels
    train: Split
    dev: tuple[Split, ...]
    test: tuple[Split, ...]
    headerless: tuple[str, ...] = ()  # column names of train/dev files that have no header line (CoLA)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def _splits(d: str, hf: str, test_name: str):
    return (Split(f"{d}/train.tsv", (hf, "train")), (Split(f"{d}/dev.tsv", (hf, "validation")),),
            (Split(f"{d}/test.tsv", (hf, "test"), submission=f"{test_name}.tsv"),))


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
_NLI3 = ("entailment", "neutral", "contradiction")

# Learning rates from BERT's grid (2e-5..5e-5): the small sets take the top of it since they get few steps.
TASKS: dict[str, Task] = {
    "cola": Task("CoLA", _BINARY, ("mcc",), 5e-5, ("sentence",), "label", ("sentence",),
                 ("unacceptable", "acceptable"), *_splits("CoLA", "cola", "CoLA"),
                 headerless=("source", "label", "original_label", "sentence")),
    "sst2": Task("SST-2", _BINARY, ("acc",), 3e-5, ("sentence",), "label", ("sentence",),
                 ("negative", "positive"), *_splits("SST-2", "sst2", "SST-2")),
    "mrpc": Task("MRPC", _BINARY, ("f1", "acc"), 5e-5, ("#1 String", "#2 String"), "Quality",
                 ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), *_splits("MRPC", "mrpc", "MRPC")),
    "stsb": Task("STS-B", None, ("pearson", "spearman"), 5e-5, ("sentence1", "sentence2"), "score",
                 ("sentence1", "sentence2"), None, *_splits("STS-B", "stsb", "STS-B")),
    "qqp": Task("QQP", _BINARY, ("f1", "acc"), 3e-5, ("question1", "question2"), "is_duplicate",
                ("question1", "question2"), ("not_duplicate", "duplicate"), *_splits("QQP", "qqp", "QQP")),
    "mnli": Task("MNLI", _NLI3, ("acc",), 3e-5, ("sentence1", "sentence2"), "gold_label", ("premise", "hypothesis"),
                 _NLI3, Split("MNLI/train.tsv", ("mnli", "train")),
                 (Split("MNLI/dev_matched.tsv", ("mnli", "validation_matched"), suffix="_m"),
                  Split("MNLI/dev_mismatched.tsv", ("mnli", "validation_mismatched"), suffix="_mm")),
                 (Split("MNLI/test_matched.tsv", ("mnli", "test_matched"), submission="MNLI-m.tsv"),
                  Split("MNLI/test_mismatched.tsv", ("mnli", "test_mismatched"), submission="MNLI-mm.tsv"),
                  # AX, the diagnostic set, has no training data: the server scores the MNLI model on it.
                  Split("diagnostic/diagnostic.tsv", ("ax", "test"), submission="AX.tsv"))),
    "qnli": Task("QNLI", _NLI2, ("acc",), 3e-5, ("question", "sentence"), "label", ("question", "sentence"),
                 _NLI2, *_splits("QNLI", "qnli", "QNLI")),
    "rte": Task("RTE", _NLI2, ("acc",), 5e-5, ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                _NLI2, *_splits("RTE", "rte", "RTE")),
    "wnli": Task("WNLI", _BINARY, ("acc",), 2e-5, ("sentence1", "sentence2"), "label", ("sentence1", "sentence2"),
                 ("not_entailment", "entailment"), *_splits("WNLI", "wnli", "WNLI")),
}
AX_FILE = "AX.tsv"
STSB_RANGE = (0.0, 5.0)
# BERT's grid is for BERT-base. Models narrower than 512 (tiny, mini) barely move at those rates: mini on SST-2
# at 3e-5 kept train loss at 0.65 after 564 steps, at 2e-4 it fell to 0.2 (README, results/sst2/).
NARROW_HIDDEN, NARROW_LR = 512, 2e-4

# ----------------------------------------------------------------------------------------------------------
# Metrics (numpy; scores are fractions, shown x100 in tables)


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    return float(np.mean(pred == label))


def _confusion(pred, label):
    pred, label = np.asarray(pred) == 1, np.asarray(label) == 1
    tp, tn = float(np.sum(pred & label)), float(np.sum(~pred & ~label))
    fp, fn = float(np.sum(pred & ~label)), float(np.sum(~pred & label))
    return tp, tn, fp, fn


def f1(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of the positive class (1); 0 when there are no positives predicted nor present (sklearn's choice)."""
    tp, _, fp, fn = _confusion(pred, label)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corr(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation of binary predictions; 0 when a margin is empty (sklearn's choice)."""
    tp, tn, fp, fn = _confusion(pred, label)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (no linear relation can be measured)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.sum(x * y) / denom) if denom else 0.0


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    _, inverse, counts = np.unique(np.asarray(x), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(average_ranks(x), average_ranks(y))


METRICS = {"acc": accuracy, "f1": f1, "mcc": matthews_corr, "pearson": pearson, "spearman": spearman}


def task_metrics(task: Task, outputs: np.ndarray, labels: np.ndarray, suffix: str = "") -> dict[str, float]:
    """outputs [N, num_labels] (logits, or the score for regression) -> {metric + suffix: value}."""
    pred = outputs[:, 0] if task.labels is None else np.argmax(outputs, axis=-1)
    return {f"{m}{suffix}": METRICS[m](pred, labels) for m in task.metrics}


def task_score(metrics: dict[str, float]) -> float:
    """A task's single GLUE number: the unweighted mean of its metrics (MNLI: of matched and mismatched acc)."""
    return float(np.mean(list(metrics.values())))


# ----------------------------------------------------------------------------------------------------------
# Reading GLUE


@dataclass
class Examples:
    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray | None  # [N] int32 class ids or float32 scores; None for test sets
    index: list[str]  # the row ids the test server matches predictions to
    skipped: int = 0  # malformed rows left out (--skip_bad_rows)
    source: str = ""

    def __len__(self) -> int:
        return len(self.text_a)

    def head(self, n: int) -> "Examples":
        return self.take(np.arange(min(n, len(self))))

    def take(self, rows: np.ndarray, source: str | None = None) -> "Examples":
        pick = lambda xs: [xs[i] for i in rows]  # noqa: E731
        return Examples(pick(self.text_a), None if self.text_b is None else pick(self.text_b),
                        None if self.labels is None else self.labels[rows], pick(self.index), self.skipped,
                        self.source if source is None else source)


def split_holdout(train_set: Examples, fraction: float) -> tuple[Examples, Examples]:
    """(train, held out): a fixed random `fraction` of the training rows (the same for every seed and run)."""
    order = np.random.default_rng(0).permutation(len(train_set))
    n_held = max(1, round(fraction * len(train_set)))
    held, kept = np.sort(order[:n_held]), np.sort(order[n_held:])
    return train_set.take(kept), train_set.take(held, f"{train_set.source} (held-out {fraction:g} of the rows)")


def read_tsv(path: str, names: tuple[str, ...] = (), skip_bad_rows: bool = False):
    """A GLUE TSV file -> (column names, [(line number, fields)], number of skipped rows).

    Lines are split on tabs only, never by a CSV reader: QNLI, STS-B and MRPC sentences hold quote characters
    that are text. utf-8-sig drops MRPC's byte-order mark. names: the columns of a file without a header (CoLA).
    A row whose field count differs from the header's is an error, or skipped and counted with skip_bad_rows.
    """
    if not os.path.isfile(path):
        raise UserError(f"missing GLUE file {path}")
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); is this a GLUE TSV file?") from None
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline; a last line without one is kept
        lines.pop()
    first = 1
    if not names:
        if not lines:
            raise UserError(f"{path} is empty (no header line)")
        names, first = tuple(lines[0].rstrip("\r").split("\t")), 2
    rows, skipped = [], 0
    for line_no, line in enumerate(lines[first - 1:], start=first):
        fields = line.rstrip("\r").split("\t")
        if len(fields) != len(names):
            if not skip_bad_rows:
                raise UserError(f"{path}:{line_no}: expected {len(names)} tab-separated fields, found "
                                f"{len(fields)} (--skip_bad_rows skips such rows)")
            skipped += 1
            continue
        rows.append((line_no, fields))
    return names, rows, skipped


def _column(path: str, names: tuple[str, ...], want: str) -> int:
    if want not in names:
        raise UserError(f"{path}: no column {want!r} in the header ({', '.join(names)}); is this the right task?")
    return names.index(want)


def parse_label(task: Task, value: str, where: str):
    if task.labels is None:
        try:
            score = float(value)
        except ValueError:
            score = float("nan")
        if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:
            raise UserError(f"{where}: {task.name} score {value!r} is not a number in "
                            f"[{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]")
        return score
    if value not in task.labels:
        raise UserError(f"{where}: label {value!r} is not one of {task.name}'s labels ({', '.join(task.labels)})")
    return task.labels.index(value)


def read_glue_file(task: Task, path: str, labelled: bool, skip_bad_rows: bool = False) -> Examples:
    """One split of a task from its GLUE TSV file; labelled: train/dev (labels required) or test (row ids)."""
    headerless = task.headerless if labelled else ()
    names, rows, skipped = read_tsv(path, headerless, skip_bad_rows)
    if not rows:
        raise UserError(f"{path} has no data rows")
    text_cols = [_column(path, names, c) for c in task.columns]
    a = [fields[text_cols[0]] for _, fields in rows]
    b = [fields[text_cols[1]] for _, fields in rows] if len(text_cols) > 1 else None
    labels, index = None, [str(i) for i in range(len(rows))]
    if labelled:
        col = _column(path, names, task.label_column)
        values = [parse_label(task, fields[col], f"{path}:{n}") for n, fields in rows]
        labels = np.asarray(values, np.float32 if task.labels is None else np.int32)
    else:
        id_col = next((names.index(c) for c in ("index", "id") if c in names), None)
        if id_col is not None:
            index = [fields[id_col] for _, fields in rows]
    if skipped:
        print(f"note: skipped {skipped} malformed row(s) in {path}" +
              ("; the test server will reject a submission with missing rows" if not labelled else ""))
    return Examples(a, b, labels, index, skipped, path)


def read_hub_split(task: Task, split: Split) -> Examples:
    """One split from the Hub dataset nyu-mll/glue (test labels there are -1: returned unlabelled)."""
    import datasets  # slow import: only for the Hub

    config, name = split.hf
    try:
        ds = datasets.load_dataset("nyu-mll/glue", config, split=name)
    except Exception as e:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
        raise UserError(f"cannot load nyu-mll/glue {config} [{name}]: {first_line(e)}") from None
    if task.labels is not None:
        names = tuple(ds.features["label"].names)
        if names != task.hf_label_names:
            raise UserError(f"nyu-mll/glue {config}: label names {names} differ from {task.hf_label_names}")
    a = list(ds[task.hf_columns[0]])
    b = list(ds[task.hf_columns[1]]) if len(task.hf_columns) > 1 else None
    labels = np.asarray(ds["label"], np.float32 if task.labels is None else np.int32)
    unlabelled = name.startswith("test")
    return Examples(a, b, None if unlabelled else labels, [str(i) for i in ds["idx"]], 0,
                    f"hf:nyu-mll/glue/{config}[{name}]")


def missing_files(task: Task, glue_dir: str, splits=None) -> list[str]:
    splits = (task.train, *task.dev) if splits is None else splits
    return [p for p in (os.path.join(glue_dir, s.file) for s in splits) if not os.path.isfile(p)]


def load_task(task: Task, glue_dir: str | None, skip_bad_rows: bool = False, require_test: bool = True,
              holdout: float = 0.0):
    """-> (train, {dev suffix: Examples}, {submission file: Examples}).

    A missing train or dev file is an error, except that with holdout > 0 a task without dev files is scored
    on that fraction of its training rows, held out. A missing test file is an error if require_test, else its
    submission is not written (with a note). A missing diagnostic file (AX, from the MNLI model) only skips AX.tsv.
    """
    if glue_dir is None:
        try:
            corpus.check_hub_reachable()
        except UserError as e:
            raise UserError(f"{str(e).split('; ')[0]}; read local GLUE files instead: --glue_dir DIR "
                            "(download_glue_data.py layout)") from None
        return (read_hub_split(task, task.train), {s.suffix: read_hub_split(task, s) for s in task.dev},
                {s.submission: read_hub_split(task, s) for s in task.test})
    if not os.path.isdir(glue_dir):
        raise UserError(f"--glue_dir {glue_dir} is not a folder")
    dev_missing = bool(missing_files(task, glue_dir, task.dev))
    use_holdout = holdout > 0 and dev_missing
    required = ([task.train] + ([] if use_holdout else list(task.dev))
                + ([s for s in task.test if s.submission != AX_FILE] if require_test else []))
    missing = missing_files(task, glue_dir, required)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing GLUE file {missing[0]}{more}")
    path = lambda s: os.path.join(glue_dir, s.file)  # noqa: E731
    train_set = read_glue_file(task, path(task.train), True, skip_bad_rows)
    if use_holdout:
        print(f"note: no {task.name} dev file: scoring on a held-out {holdout:g} of {path(task.train)}")
        train_set, held = split_holdout(train_set, holdout)
        dev = {task.dev[0].suffix: held}
    else:
        dev = {s.suffix: read_glue_file(task, path(s), True, skip_bad_rows) for s in task.dev}
    test = {}
    for s in task.test:
        if not os.path.isfile(path(s)) and (s.submission == AX_FILE or not require_test):
            print(f"note: no {path(s)}: {s.submission} is not written")
            continue
        test[s.submission] = read_glue_file(task, path(s), False, skip_bad_rows)
    return train_set, dev, test


# ----------------------------------------------------------------------------------------------------------
# Tokenising and length bucketing


@dataclass
class Encoded:
    ids: np.ndarray  # [N, max_len] int32, zero ([PAD]) after each row's length
    types: np.ndarray  # [N, max_len] int8 token types (0 = sentence A, 1 = sentence B)
    lengths: np.ndarray  # [N] int32


def prepare_tokenizer(tok: Tokenizer, max_len: int) -> Tokenizer:
    """BERT inputs: '[CLS] A [SEP] B [SEP]' with types 0/1, pairs cut longest-first to max_len, no padding."""
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    tok.enable_truncation(max_len, strategy="longest_first")
    tok.no_padding()
    return tok


def encode(tok: Tokenizer, examples: Examples, max_len: int, chunk: int = 20000) -> Encoded:
    """Tokenise with a tokenizer made ready by prepare_tokenizer(tok, max_len)."""
    n = len(examples)
    ids = np.zeros((n, max_len), np.int32)
    types = np.zeros((n, max_len), np.int8)
    lengths = np.zeros(n, np.int32)
    for start in tqdm(range(0, n, chunk), desc="tokenising", leave=False, disable=n <= chunk):
        a = examples.text_a[start:start + chunk]
        inputs = a if examples.text_b is None else list(zip(a, examples.text_b[start:start + chunk]))
        for i, e in enumerate(tok.encode_batch(inputs), start=start):
            lengths[i] = len(e.ids)
            ids[i, :len(e.ids)] = e.ids
            types[i, :len(e.ids)] = e.type_ids
    return Encoded(ids, types, lengths)


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
    label_dtype = np.int32 if labels is None else labels.dtype
    batch_labels = np.zeros(batch_size, label_dtype)
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


def default_lr(task: Task, cfg: bert.BertConfig) -> float:
    """Peak learning rate without --lr: the task's, or NARROW_LR for a model narrower than NARROW_HIDDEN."""
    return NARROW_LR if cfg.hidden_size < NARROW_HIDDEN else task.lr


def lr_at(step: int, lr: float, total_steps: int, warmup_steps: int) -> float:
    """Linear warmup from 0 to lr over warmup_steps, then linear decay to 0 at total_steps."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    return lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(weight_decay: float, clip_norm: float = 1.0) -> optax.GradientTransformation:
    """AdamW as in BERT (eps 1e-6, no decay on biases and LayerNorm) after global-norm clipping, without the
    learning rate: the step multiplies by it, so one compiled step serves every task, lr and schedule."""
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731 (matrices only)
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6),
                       optax.add_decayed_weights(weight_decay, mask=decay_mask))


def make_train_step(model: hk.Transformed, optimizer: optax.GradientTransformation, regression: bool):
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
        new_params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        if isinstance(loss_scale, jmp.NoOpLossScale):
            return new_params, new_opt_state, loss_scale, loss
        finite = jmp.all_finite(grads)  # fp16: skip steps whose gradients overflowed, and adjust the scale
        params, opt_state = jmp.select_tree(finite, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, loss_scale.adjust(finite), loss

    return step


@functools.lru_cache(maxsize=None)
def compiled_fns(cfg: bert.BertConfig, num_labels: int, regression: bool, weight_decay: float, precision: str):
    """(train step, logits fn, optimizer), shared by every seed and task with the same model and head, so that
    each batch shape compiles once per run (--task all: once for the seven two-label tasks). precision is part
    of the key because tracing reads the haiku policy that set_precision installed."""
    model = bert.classifier_model(cfg, num_labels)
    optimizer = make_optimizer(weight_decay)
    logits_fn = jax.jit(lambda params, tokens, types, mask: model.apply(params, None, tokens, types, mask, False))
    return make_train_step(model, optimizer, regression), logits_fn, optimizer


# ----------------------------------------------------------------------------------------------------------
# Where the weights come from: a train.py checkpoint (--init) or random (--from_scratch)


@dataclass
class Init:
    cfg: bert.BertConfig
    pretrained: dict | None  # haiku params {module: {name: array}} of the checkpoint; None = from scratch
    tokenizer: Tokenizer
    info: dict  # what the results JSON records about the start point


def load_init(args) -> Init:
    overrides = {} if args.dropout is None else {"dropout": args.dropout}
    if sum(map(bool, (args.init, args.init_hf, args.from_scratch))) > 1:
        raise UserError("give only one of --init DIR, --init_hf DIR and --from_scratch")
    if args.init_hf:
        return load_init_hf(args, overrides)
    if args.from_scratch:
        if not args.tokenizer or not args.model:
            raise UserError("--from_scratch needs --tokenizer FILE and --model PRESET (random weights)")
        tok = common.load_tokenizer(args.tokenizer)
        cfg = bert.make_config(args.model, tok.get_vocab_size(), **overrides)
        return Init(cfg, None, tok, {"from_scratch": True, "model": args.model, "tokenizer": args.tokenizer,
                                     "tokenizer_sha256": common.sha256_file(args.tokenizer)})
    if not args.init and os.path.isdir(DEFAULT_INIT):
        args.init = DEFAULT_INIT  # train.py's default --out_dir
    if not args.init:
        raise UserError(f"no {DEFAULT_INIT}/ here (train.py's default output); give --init DIR (a train.py out_dir or ckpt_<step> folder) or --init_hf DIR (a Hugging Face "
                        "BERT folder) to finetune pretrained weights, or --from_scratch --tokenizer FILE --model "
                        "PRESET for random ones")
    if args.model:
        raise UserError("--model only applies with --from_scratch; the checkpoint fixes the model shape")
    params, state = train.load_checkpoint(args.init)
    ckpt, ckpt_tok_path = state["path"], state["tokenizer_path"]
    if not args.tokenizer and not os.path.isfile(ckpt_tok_path):
        raise UserError(f"checkpoint {ckpt} has no tokenizer.json; pass the one it was pretrained with: "
                        "--tokenizer FILE")
    tok_path = args.tokenizer or ckpt_tok_path
    tok = common.load_tokenizer(tok_path)
    try:
        cfg = dataclasses.replace(bert.BertConfig(**state["config"]), **overrides)
    except (TypeError, KeyError) as e:
        raise UserError(f"checkpoint {ckpt}: unreadable model config in state.json ({e})") from None
    if tok.get_vocab_size() != cfg.vocab_size:
        raise UserError(f"tokenizer {tok_path} has {tok.get_vocab_size()} tokens but checkpoint {ckpt} was trained "
                        f"with vocab_size {cfg.vocab_size}: use the tokenizer it was pretrained with")
    if args.tokenizer and os.path.isfile(ckpt_tok_path):
        if common.load_tokenizer(ckpt_tok_path).get_vocab() != tok.get_vocab():
            raise UserError(f"tokenizer {tok_path} has a different vocabulary from {ckpt_tok_path}, the one "
                            f"checkpoint {ckpt} was pretrained with")
    info = {"checkpoint": os.path.abspath(ckpt), "step": state.get("step"), "tokens_seen": state.get("tokens_seen"),
            "tokenizer": tok_path, "tokenizer_sha256": common.sha256_file(tok_path)}
    return Init(cfg, params, tok, info)


def load_init_hf(args, overrides: dict) -> Init:
    """--init_hf: a Hugging Face BERT folder with its tokenizer converted by hf.py; every task trains a new
    classifier (the folder's own, if any, has its own labels)."""
    if args.model or args.tokenizer:
        raise UserError("--init_hf takes the model and its tokenizer from the folder; drop --model and --tokenizer")
    cfg, params, tokenizer_bytes, info = hf.load_hf(args.init_hf)
    if params.pop("classifier", None) is not None:
        print(f"note: {args.init_hf}: its classifier ({info['num_labels']} labels) is not used")
    fresh = ["bert/pooler/dense"] * ("bert/pooler/dense" not in params) + ["classifier"]
    print(f"note: {args.init_hf}: initialised fresh for each task: {', '.join(fresh)}")
    info = {"init_hf": info["source"], "tokenizer_sha256": common.sha256_bytes(tokenizer_bytes)}
    return Init(dataclasses.replace(cfg, **overrides), params, Tokenizer.from_str(tokenizer_bytes.decode()), info)


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
    encoder = jax.eval_shape(bert.mlm_model(cfg).init, key, tokens, jnp.zeros((1, 1), jnp.int32))
    merged, fresh = {}, []
    for module, leaves in params.items():
        merged[module] = {}
        for name, value in leaves.items():
            got = pretrained.get(module, {}).get(name)
            if got is None:
                if name in encoder.get(module, {}):
                    raise UserError(f"the checkpoint lacks encoder parameter {module}/{name}")
                fresh.append(f"{module}/{name}")
                merged[module][name] = value
            elif tuple(got.shape) != tuple(value.shape):
                raise UserError(f"checkpoint parameter {module}/{name} has shape {tuple(got.shape)}, the model "
                                f"needs {tuple(value.shape)}")
            else:
                merged[module][name] = jnp.asarray(got, value.dtype)
    return merged, fresh


# ----------------------------------------------------------------------------------------------------------
# Finetuning one task


@dataclass
class TaskData:
    train: Encoded
    train_labels: np.ndarray
    dev: dict  # suffix -> (Encoded, labels)
    test: dict  # submission file -> (Encoded, row ids)
    info: dict


def encode_task(tok: Tokenizer, train_set: Examples, dev: dict, test: dict, max_len: int) -> TaskData:
    describe = lambda e: {"rows": len(e), "source": e.source, "skipped_rows": e.skipped}  # noqa: E731
    info = {"train": describe(train_set), "dev": {s or "dev": describe(e) for s, e in dev.items()},
            "test": {f: describe(e) for f, e in test.items()}}
    return TaskData(encode(tok, train_set, max_len), train_set.labels,
                    {s: (encode(tok, e, max_len), e.labels) for s, e in dev.items()},
                    {f: (encode(tok, e, max_len), e.index) for f, e in test.items()}, info)


def evaluate(task: Task, logits_fn, params, data: TaskData, args) -> dict[str, float]:
    metrics = {}
    for suffix, (enc, labels) in data.dev.items():
        outputs = predict(logits_fn, params, enc, args.eval_batch_size, args.pad_multiple)
        metrics.update(task_metrics(task, outputs, labels, suffix))
    return metrics


def prediction_strings(task: Task, outputs: np.ndarray) -> list[str]:
    if task.labels is None:
        return [f"{x:.3f}" for x in outputs[:, 0]]
    return [task.labels[i] for i in np.argmax(outputs, axis=-1)]


def write_submission(path: str, index: list[str], predictions: list[str]) -> None:
    """GLUE server format: header 'index<TAB>prediction', one row per test example, in the file's order."""
    assert len(index) == len(predictions), (len(index), len(predictions))
    lines = ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(index, predictions)]
    common.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def train_epoch(step_fn, state: tuple, enc: Encoded, labels: np.ndarray, batches: list, args, key, step: int,
                lr_fn, desc: str = "", on_log=None):
    """One pass over batches (index arrays from make_batches). state = (params, opt_state, loss_scale);
    lr_fn(step) -> learning rate. -> (state, step, mean loss). on_log(step, recent mean loss) every log_every."""
    losses = []
    bar = tqdm(batches, desc=desc, unit="batch", leave=False)
    for idx in bar:
        b = collate(enc, idx, args.batch_size, args.pad_multiple, labels)
        *state, loss = step_fn(*state, b.tokens, b.types, b.mask, b.labels, b.weights, key, step,
                               np.float32(lr_fn(step)))
        losses.append(loss)
        step += 1
        if step % args.log_every == 0:
            recent = float(jnp.mean(jnp.stack(losses[-args.log_every:])))
            bar.set_postfix(loss=f"{recent:.4f}", refresh=False)
            if on_log is not None:
                on_log(step, recent)
    return tuple(state), step, float(jnp.mean(jnp.stack(losses)))


def train_seed(task: Task, init: Init, data: TaskData, args, seed: int, lr_fn, log_dir: str) -> dict:
    """Finetune from init with one seed; evaluate on dev after each epoch; predict test with the best epoch."""
    from tensorboardX import SummaryWriter

    step_fn, logits_fn, optimizer = compiled_fns(init.cfg, task.num_labels, task.labels is None, args.weight_decay,
                                                 args.precision)
    params, fresh = init_params(init.cfg, task.num_labels, init.pretrained, jax.random.PRNGKey(seed))
    loss_scale = jmp.DynamicLossScale(jnp.float32(2 ** 15)) if args.precision == "fp16" else jmp.NoOpLossScale()
    state = (params, optimizer.init(params), loss_scale)
    rng, dropout_key = np.random.default_rng(seed), jax.random.PRNGKey(seed + 1_000_003)
    writer = SummaryWriter(log_dir)

    def on_log(step, loss):
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/lr", lr_fn(step), step)

    epochs, best, best_record, step = [], None, None, 0
    try:
        for epoch in range(1, args.epochs + 1):
            start = time.time()
            batches = make_batches(data.train.lengths, args.batch_size, rng)
            state, step, train_loss = train_epoch(step_fn, state, data.train, data.train_labels, batches, args,
                                                  dropout_key, step, lr_fn, f"{task.name} seed {seed} epoch {epoch}",
                                                  on_log)
            train_seconds = time.time() - start
            metrics = evaluate(task, logits_fn, state[0], data, args)
            score = task_score(metrics)
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
    finally:
        writer.close()
    test_outputs = {f: predict(logits_fn, best, enc, args.eval_batch_size, args.pad_multiple)
                    for f, (enc, _) in data.test.items()}
    return {"seed": seed, "epochs": epochs, "best_epoch": best_record["epoch"], "best": best_record["dev"],
            "best_score": best_record["score"], "new_params": fresh, "test_outputs": test_outputs}


def run_task(task: Task, init: Init, data: TaskData, args) -> dict:
    """All seeds of one task -> the results dict (also written to out_dir/<TASK>.json) and submission files."""
    start = time.time()
    lr = args.lr if args.lr is not None else default_lr(task, init.cfg)
    steps_per_epoch = -(-len(data.train.lengths) // args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    lr_fn = functools.partial(lr_at, lr=lr, total_steps=total_steps, warmup_steps=round(args.warmup * total_steps))
    runs = []
    for i in range(args.seeds):
        seed = args.seed + i
        runs.append(train_seed(task, init, data, args, seed, lr_fn,
                               os.path.join(args.out_dir, "tb", task.name, f"seed{seed}")))
    # The submission comes from the median seed (by its best dev score; the upper one of two middles).
    chosen = sorted(runs, key=lambda r: (r["best_score"], r["seed"]))[len(runs) // 2]
    submission_dir = os.path.join(args.out_dir, "submission")
    written = []
    for file, outputs in chosen["test_outputs"].items():
        write_submission(os.path.join(submission_dir, file), data.test[file][1], prediction_strings(task, outputs))
        written.append(os.path.join(submission_dir, file))
    median = {k: statistics.median(r["best"][k] for r in runs) for k in runs[0]["best"]}
    result = {
        "task": task.name, "metrics": list(median), "median": median,
        "median_score": statistics.median(r["best_score"] for r in runs),
        "seeds": [{k: v for k, v in r.items() if k != "test_outputs"} for r in runs],
        "submission_seed": chosen["seed"], "submission_files": written,
        "config": {"lr": lr, "epochs": args.epochs, "batch_size": args.batch_size, "max_len": args.max_len,
                   "warmup": args.warmup, "weight_decay": args.weight_decay, "precision": args.precision,
                   "seeds": [r["seed"] for r in runs], "steps": total_steps, "pad_multiple": args.pad_multiple,
                   "max_train_examples": args.max_train_examples, "model": dataclasses.asdict(init.cfg)},
        "init": init.info, "data": data.info, "wall_seconds": time.time() - start,
    }
    common.atomic_write_json(os.path.join(args.out_dir, f"{task.name}.json"), result)
    print(f"{task.name}: median over {len(runs)} seed(s): "
          + ", ".join(f"{k} {100 * v:.2f}" for k, v in median.items())
          + f"; wrote {os.path.join(args.out_dir, task.name + '.json')} and " + ", ".join(written), flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------
# The GLUE table

# Leaderboard columns: (header, task key, metrics shown "a/b").
TABLE = [("CoLA", "cola", ("mcc",)), ("SST-2", "sst2", ("acc",)), ("MRPC", "mrpc", ("f1", "acc")),
         ("STS-B", "stsb", ("pearson", "spearman")), ("QQP", "qqp", ("f1", "acc")), ("MNLI-m", "mnli", ("acc_m",)),
         ("MNLI-mm", "mnli", ("acc_mm",)), ("QNLI", "qnli", ("acc",)), ("RTE", "rte", ("acc",)),
         ("WNLI", "wnli", ("acc",))]


def glue_score(medians: dict[str, dict[str, float]]) -> float:
    """The GLUE score: the unweighted mean over tasks of each task's score, where a task with two metrics
    (MRPC, QQP, STS-B) counts their mean and MNLI counts once, as the mean of matched and mismatched accuracy;
    AX is not part of it. This reproduces the leaderboard: e.g. BERT-large's rows (CoLA 60.5, SST-2 94.9,
    MRPC 89.3/85.4, STS-B 87.6/86.5, QQP 72.1/89.3, MNLI 86.7/85.9, QNLI 92.7, RTE 70.1, WNLI 65.1) give 80.5,
    its listed score (counting MNLI-m and MNLI-mm as two tasks would give 81.1)."""
    return float(np.mean([task_score(m) for m in medians.values()]))


def glue_table(medians: dict[str, dict[str, float]]) -> str:
    """medians: task key -> median metrics (fractions). Cells x100; '-' for tasks not run."""
    cells = []
    for header, key, names in TABLE:
        m = medians.get(key)
        cells.append("-" if m is None else "/".join(f"{100 * m[n]:.1f}" for n in names))
    headers = [h for h, _, _ in TABLE] + ["Score"]
    cells.append(f"{100 * glue_score(medians):.1f}" if medians else "-")
    widths = [max(len(h), len(c)) for h, c in zip(headers, cells)]
    line = lambda row: "  ".join(s.rjust(w) for s, w in zip(row, widths))  # noqa: E731
    return line(headers) + "\n" + line(cells)


# ----------------------------------------------------------------------------------------------------------
# CLI


DEFAULT_INIT = "out"


def _task_key(s: str) -> str:
    return s.lower().replace("-", "")  # accepts GLUE's spellings too: SST-2, STS-B, MNLI


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, type=_task_key, choices=[*TASKS, "all"],
                   help="GLUE task, or 'all' for every task with train and dev data plus a GLUE table "
                        "(AX, the diagnostic set, is predicted with the MNLI model)")
    p.add_argument("--glue_dir", help="read the GLUE TSV files from this folder (download_glue_data.py layout: "
                                      "DIR/SST-2/train.tsv, ...); default: the Hub dataset nyu-mll/glue")
    p.add_argument("--holdout", type=float, default=0.0,
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
    g.add_argument("--lr", type=float, help=f"peak learning rate (default: {NARROW_LR:g} for models with hidden size "
                   f"under {NARROW_HIDDEN}, such as tiny and mini; else per task, "
                   + ", ".join(f"{t.name} {t.lr:g}" for t in TASKS.values()) + ")")
    g.add_argument("--epochs", type=int, default=3, help="epochs over the training set (default: 3)")
    g.add_argument("--batch_size", type=int, default=32, help="training batch size (default: 32)")
    g.add_argument("--max_len", type=int, default=128,
                   help="tokens per example incl. [CLS]/[SEP]; pairs are cut longest-first (default: 128)")
    g.add_argument("--warmup", type=float, default=0.1,
                   help="fraction of steps of linear warmup, then linear decay to 0 (default: 0.1)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (default: 0.01)")
    g.add_argument("--dropout", type=float, help="dropout rate (default: the checkpoint's config)")
    g.add_argument("--precision", choices=list(bert.PRECISIONS),
                   help="compute dtype as in train.py; params stay fp32; fp16 adds dynamic loss scaling "
                        "(default: bf16 on GPU/TPU, fp32 on CPU)")
    g.add_argument("--seeds", type=int, default=1,
                   help="finetune this many times with different seeds and report the median (default: 1)")
    g.add_argument("--seed", type=int, default=0, help="first seed; the runs use seed, seed+1, ... (default: 0)")
    g.add_argument("--max_train_examples", type=int, default=0,
                   help="use only the first N training rows, for quick runs (default: 0 = all)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval_batch_size", type=int, default=128, help="batch size for dev/test (default: 128)")
    g.add_argument("--pad_multiple", type=int, default=8,
                   help="batches are padded to a multiple of this length (coarser above 8x it): fewer distinct "
                        "shapes, i.e. jit compilations, against less padding (default: 8)")
    g.add_argument("--log_every", type=int, default=50, help="steps between loss logs (default: 50)")
    g.add_argument("--out_dir", default="out/glue",
                   help="results JSON, submission/ files and tb/ logs go here (default: out/glue)")
    args = p.parse_args(argv)
    for name, low in (("epochs", 1), ("batch_size", 1), ("seeds", 1), ("eval_batch_size", 1), ("pad_multiple", 1),
                      ("log_every", 1), ("max_len", 8), ("max_train_examples", 0)):
        if getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}")
    if args.lr is not None and not args.lr > 0:
        p.error("--lr must be > 0")
    if not 0 <= args.holdout < 1:
        p.error("--holdout must be in [0, 1)")
    if not 0 <= args.warmup < 1:
        p.error("--warmup must be in [0, 1)")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1)")
    args.precision = args.precision or ("fp32" if jax.default_backend() == "cpu" else "bf16")
    return args


def load_for_run(task: Task, args, init: Init, required: bool) -> TaskData | None:
    """Read and tokenise a task. required=False (--task all): a task lacking train or dev data is skipped
    (None) and one lacking test data runs without writing its submission file, each with a note."""
    if not required and args.glue_dir is not None:
        missing = missing_files(task, args.glue_dir, [task.train] + ([] if args.holdout else list(task.dev)))
        if missing:
            print(f"note: skipping {task.name}: missing " + ", ".join(missing))
            return None
    train_set, dev, test = load_task(task, args.glue_dir, args.skip_bad_rows, required, args.holdout)
    if args.max_train_examples:
        train_set = train_set.head(args.max_train_examples)
    return encode_task(init.tokenizer, train_set, dev, test, args.max_len)


def main(argv=None) -> dict:
    args = parse_args(argv)
    keys = list(dict.fromkeys(key for _, key, _ in TABLE)) if args.task == "all" else [args.task]
    init = load_init(args)
    if args.max_len > init.cfg.max_position:
        raise UserError(f"--max_len {args.max_len} exceeds the model's max_position {init.cfg.max_position}")
    if args.glue_dir is not None and not os.path.isdir(args.glue_dir):
        raise UserError(f"--glue_dir {args.glue_dir} is not a folder")
    prepare_tokenizer(init.tokenizer, args.max_len)
    bert.set_precision(args.precision)
    try:
        os.makedirs(os.path.join(args.out_dir, "submission"), exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out_dir {args.out_dir}: {e.strerror or e}") from None
    # Read every task before training any, so that bad data stops the run at once, not hours in.
    loaded = {key: load_for_run(TASKS[key], args, init, required=args.task != "all") for key in keys}
    results = {key: run_task(TASKS[key], init, data, args) for key, data in loaded.items() if data is not None}
    if args.task == "all":
        if not results:
            raise UserError(f"no GLUE task has both train and dev data under {args.glue_dir}")
        medians = {k: r["median"] for k, r in results.items()}
        table = glue_table(medians)
        note = "" if len(medians) == len(TASKS) else \
            f" ({len(medians)} of {len(TASKS)} tasks: not comparable to the leaderboard's score)"
        print(f"\nGLUE dev scores, median of {args.seeds} seed(s){note}:\n{table}")
        common.atomic_write_json(os.path.join(args.out_dir, "glue.json"),
                                 {"medians": medians, "score": glue_score(medians), "tasks": list(medians),
                                  "table": table, "seeds": args.seeds})
    return results


if __name__ == "__main__":
    common.run_main(main)
