"""Run a finetuned classifier (a model folder that finetune.py saved, <out_dir>/<TASK>.model) on new text.

    echo "a gorgeous, witty, seductive movie." | python predict.py --model out/glue/SST-2.model
    python predict.py --model out/glue/SST-2.model --input reviews.tsv --out predictions.tsv
    python predict.py --model out/glue/RTE.model --input pairs.jsonl --columns premise,hypothesis --format jsonl

Input: one example per line on stdin (for a two-text task such as RTE or STS-B, the two texts separated by a tab),
or --input FILE: a TSV file with a header line (tab-separated only, as GLUE's files), or JSON lines (*.jsonl,
*.json), whose text columns --columns names (default: the task's own, as in its GLUE files: sentence for SST-2,
sentence1,sentence2 for RTE). Output, one line per example in input order, on stdout or --out: the predicted
label's name and its probability (softmax), or the score of a regression task (STS-B, clipped to [0, 5] as in
finetune.py's files), as TSV (`positive<TAB>0.9731`) or JSON lines (`{"label": "positive", "probability": 0.9731,
"probabilities": {...}}`). An example longer than --max_len tokens is cut (pairs longest-first), with one warning.
Tokenised, length-bucketed and batched by finetune.py's own evaluation code, so a model folder's predictions on
its task's dev file are the ones finetune.py wrote to <TASK>.dev.tsv.
"""
import argparse
import json
import os
import sys

import numpy as np

import checkpoint
import common
import finetune
import glue
import model as bert
from common import UserError


def read_stdin(n_texts: int) -> tuple[list[list[str]], str]:
    """Every line of stdin is an example; with n_texts 2 its texts are split at the first tab."""
    data = sys.stdin.buffer.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"stdin is not UTF-8 text (byte {e.start})") from None
    lines = text.splitlines()
    if not lines:
        raise UserError("no input: stdin is empty (give one example per line, or --input FILE)")
    if n_texts == 1:
        return [[line] for line in lines], "stdin line"
    rows = [line.split("\t", 1) for line in lines]
    for n, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise UserError(f"stdin line {n}: this model takes two texts per example, separated by a tab")
    return rows, "stdin line"


def read_file(path: str, columns: list[str]) -> tuple[list[list[str]], str]:
    """The text columns of a TSV file with a header, or the fields of a JSON lines file (*.jsonl, *.json)."""
    if not os.path.isfile(path):
        raise UserError(f"--input {path} is not a file")
    hint = "name the text column(s) with --columns"
    if path.endswith((".jsonl", ".json")):
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not UTF-8 text (byte {e.start})") from None
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"{path}:{n}: not a JSON object ({common.first_line(e)})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}:{n}: not a JSON object")
            for c in columns:
                if not isinstance(obj.get(c), str):
                    raise UserError(f"{path}:{n}: no text field {c!r}" + ("" if c not in obj else " (not a string)")
                                    + f"; {hint}")
            rows.append([obj[c] for c in columns])
        where = "example"
    else:
        names, found, _ = glue.read_tsv(path)
        for c in columns:
            if c not in names:
                raise UserError(f"{path}: no column {c!r} in the header ({', '.join(names)}); {hint}")
        rows = [[fields[names.index(c)] for c in columns] for _, fields in found]
        where = "data row"
    if not rows:
        raise UserError(f"{path} has no examples")
    return rows, where


def format_lines(outputs: np.ndarray, classifier: checkpoint.Classifier, task: glue.Task | None,
                 fmt: str) -> list[str]:
    """outputs [N, num_labels] -> one output line per example."""
    if classifier.labels is None:
        scores = glue.predictions(task, outputs) if task is not None else outputs[:, 0]
        return [f"{s:.3f}" if fmt == "tsv" else json.dumps({"score": float(s)}) for s in scores]
    z = outputs - outputs.max(axis=-1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)  # [N, L]
    best = probs.argmax(axis=-1)
    if fmt == "tsv":
        return [f"{classifier.labels[k]}\t{p[k]:.4f}" for k, p in zip(best, probs)]
    return [json.dumps({"label": classifier.labels[k], "probability": float(p[k]),
                        "probabilities": dict(zip(classifier.labels, map(float, p)))}) for k, p in zip(best, probs)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model folder finetune.py saved (<out_dir>/<TASK>.model)")
    p.add_argument("--input", help="a TSV file with a header line, or JSON lines (*.jsonl, *.json); default: stdin, "
                                   "one example per line (two texts: separated by a tab)")
    p.add_argument("--columns", help="comma-separated names of the text column(s) of --input (one, or two for a "
                                     "two-text task; default: the task's GLUE column names)")
    p.add_argument("--format", choices=["tsv", "jsonl"], default="tsv",
                   help="output: label<TAB>probability (or the score) per line, or JSON lines (default: tsv)")
    p.add_argument("--out", help="write the output to this file (atomically) instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--max_len", type=int,
                   help="tokens per example incl. [CLS]/[SEP]; longer ones are cut (default: the model's, as it "
                        "was finetuned)")
    p.add_argument("--batch_size", type=int, default=128, help="examples per batch (default: 128, finetune.py's "
                                                               "--eval_batch_size)")
    p.add_argument("--pad_multiple", type=int, default=8,
                   help="batches are padded to a multiple of this length, as in finetune.py (default: 8)")
    p.add_argument("--precision", choices=list(bert.PRECISIONS),
                   help="compute dtype (default: the one the model was finetuned with, so that its predictions are "
                        "the ones finetune.py wrote)")
    args = p.parse_args(argv)
    for name, low in (("batch_size", 1), ("pad_multiple", 1), ("max_len", 8)):
        if getattr(args, name) is not None and getattr(args, name) < low:
            p.error(f"--{name} must be >= {low}")
    return args


def main(argv=None) -> list[str]:
    args = parse_args(argv)
    if args.out:
        common.check_new_file(args.out, args.overwrite)
    classifier = checkpoint.load_model_folder(args.model)
    task = glue.TASKS.get(glue.task_key(classifier.task))
    n_texts = len(task.columns) if task is not None else 1
    columns = args.columns.split(",") if args.columns else list(task.columns) if task is not None else ["sentence"]
    if len(columns) != n_texts:
        raise UserError(f"--columns names {len(columns)} column(s), but {args.model} ({classifier.task}) takes "
                        f"{n_texts} text(s) per example")
    max_len = args.max_len or classifier.max_len
    if max_len > classifier.cfg.max_position:
        raise UserError(f"--max_len {max_len} exceeds the model's max_position {classifier.cfg.max_position}")
    tok = common.load_tokenizer(classifier.tokenizer_path)
    if tok.get_vocab_size() != classifier.cfg.vocab_size:
        raise UserError(f"damaged model folder {args.model}: tokenizer.json has {tok.get_vocab_size()} tokens, the "
                        f"model {classifier.cfg.vocab_size}")
    rows, where = read_file(args.input, columns) if args.input else read_stdin(n_texts)

    finetune.prepare_tokenizer(tok, max_len)
    examples = glue.Examples([r[0] for r in rows], [r[1] for r in rows] if n_texts == 2 else None, None,
                             [str(i) for i in range(len(rows))])
    enc = finetune.encode(tok, examples, max_len)
    if enc.truncated.any():
        first = int(np.flatnonzero(enc.truncated)[0]) + 1
        print(f"warning: {int(enc.truncated.sum())} of {len(rows)} examples are longer than --max_len {max_len} "
              f"tokens and were cut (the first: {where} {first})", file=sys.stderr)
    bert.set_precision(args.precision or classifier.precision)
    logits_fn = finetune.make_logits_fn(classifier.cfg, classifier.num_labels, classifier.pooling)
    outputs = finetune.predict(logits_fn, classifier.params, enc, args.batch_size, args.pad_multiple)
    lines = format_lines(outputs, classifier, task, args.format)
    text = "".join(line + "\n" for line in lines)
    if args.out:
        try:
            common.atomic_write_bytes(args.out, text.encode())
        except OSError as e:
            raise UserError(f"cannot write {args.out}: {e.strerror or e}") from None
    else:
        sys.stdout.write(text)
    return lines


if __name__ == "__main__":
    common.run_main(main)
