"""GLUE: the nine tasks (files, columns, labels, official metrics), reading them from the original TSV layout or
the Hugging Face Hub (nyu-mll/glue) with each task's quirks, the metrics, the GLUE table and score, and the
submission files the GLUE test server takes. No model here: finetune.py trains and predicts.

--glue_dir reads the download_glue_data.py layout: DIR/CoLA/train.tsv, DIR/MNLI/dev_matched.tsv,
DIR/diagnostic/diagnostic.tsv, ... Quirks handled: CoLA's train and dev files have no header; MRPC's start with a
byte-order mark; QNLI, STS-B and MRPC sentences hold quote characters that are text (tabs only, never a CSV reader);
MNLI has matched and mismatched dev and test sets; AX, the diagnostic set, is predicted by the MNLI model.
"""
import os
from dataclasses import dataclass

import numpy as np

import common
import corpus
from common import UserError, first_line

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


def task_key(name: str) -> str:
    """A TASKS key from GLUE's spellings too: SST-2 -> sst2, STS-B -> stsb, MNLI -> mnli."""
    return name.lower().replace("-", "")


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


def predictions(task: Task, outputs: np.ndarray) -> np.ndarray:
    """outputs [N, num_labels] (logits, or the score for regression) -> class ids, or scores clipped to STS-B's
    range. Dev metrics, dev prediction files and submissions all use these, so dev scores what is submitted."""
    return np.clip(outputs[:, 0], *STSB_RANGE) if task.labels is None else np.argmax(outputs, axis=-1)


def task_metrics(task: Task, outputs: np.ndarray, labels: np.ndarray, suffix: str = "") -> dict[str, float]:
    """outputs [N, num_labels] -> {metric + suffix: value} of predictions(task, outputs)."""
    return {f"{m}{suffix}": METRICS[m](predictions(task, outputs), labels) for m in task.metrics}


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
        raise UserError(f"{path} has no data rows" + (f" ({skipped} skipped as malformed)" if skipped else ""))
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
    return Examples(a, b, None if name.startswith("test") else labels, [str(i) for i in ds["idx"]], 0,
                    f"hf:nyu-mll/glue/{config}[{name}]")


def missing_files(glue_dir: str, splits) -> list[str]:
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
    use_holdout = holdout > 0 and bool(missing_files(glue_dir, task.dev))
    required = ([task.train] + ([] if use_holdout else list(task.dev))
                + ([s for s in task.test if s.submission != AX_FILE] if require_test else []))
    missing = missing_files(glue_dir, required)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing GLUE file {missing[0]}{more}")
    path = lambda s: os.path.join(glue_dir, s.file)  # noqa: E731
    train_set = read_glue_file(task, path(task.train), True, skip_bad_rows)
    if use_holdout:
        print(f"note: no {task.name} dev file: scoring on a held-out {holdout:g} of {path(task.train)}")
        train_set, held = split_holdout(train_set, holdout)
        if not len(train_set):
            raise UserError(f"--holdout {holdout:g} holds out all {len(held)} rows of {path(task.train)}, leaving "
                            "none to train on; use a smaller fraction")
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
    cells = ["-" if key not in medians else "/".join(f"{100 * medians[key][n]:.1f}" for n in names)
             for _, key, names in TABLE]
    headers = [h for h, _, _ in TABLE] + ["Score"]
    cells.append(f"{100 * glue_score(medians):.1f}" if medians else "-")
    widths = [max(len(h), len(c)) for h, c in zip(headers, cells)]
    line = lambda row: "  ".join(s.rjust(w) for s, w in zip(row, widths))  # noqa: E731
    return line(headers) + "\n" + line(cells)


# ----------------------------------------------------------------------------------------------------------
# Submission files


def label_strings(task: Task, values: np.ndarray) -> list[str]:
    """Class ids or scores as GLUE's files spell them."""
    return [f"{x:.3f}" for x in values] if task.labels is None else [task.labels[i] for i in values]


def write_predictions(path: str, task: Task, index: list[str], outputs: np.ndarray,
                      labels: np.ndarray | None = None) -> None:
    """GLUE server format (header 'index<TAB>prediction', rows in the file's order); labels (dev) add a column."""
    columns = {"index": index, "prediction": label_strings(task, predictions(task, outputs))}
    if labels is not None:
        columns["label"] = label_strings(task, labels)
    lines = ["\t".join(columns)] + ["\t".join(row) for row in zip(*columns.values(), strict=True)]
    common.atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def write_submissions(task: Task, outputs: dict[str, np.ndarray], index: dict[str, list[str]],
                      folder: str) -> list[str]:
    """One submission file per test set: outputs and index map its file name (e.g. MNLI-m.tsv) to the model's
    outputs [N, num_labels] and the test file's row ids. folder is made only if there is a file to write.
    -> the paths written."""
    paths = [os.path.join(folder, file) for file in outputs]
    if paths:
        common.make_folder(folder)
    for path, (file, out) in zip(paths, outputs.items()):
        write_predictions(path, task, index[file], out)
    return paths
