"""Tokenize a corpus into flat token-id files for pretraining, and read random windows back out of them.

    python data.py --tokenizer tokenizer.json --out data --text_files 'wiki/AA/wiki_*'

The output folder holds train.bin and val.bin (every document's tokens followed by one [SEP], documents one after
another, as uint16, or uint32 when the vocabulary has more than 65536 tokens) and meta.json. meta.json is written
last: a folder without it is incomplete, and load_meta / TokenReader refuse it.
"""
import contextlib
import hashlib
import itertools
import json
import os
import queue
import re
import sys
import threading
import time
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

import common
import corpus
from common import SEP_ID, SPECIAL_TOKENS, UserError

FORMAT = 1
VAL_TOKENS_NEEDED = 128 + 1  # windows of train.py's default --seq_len 128, plus the shifted token
SPLITS = ("train", "val")
META = "meta.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id below vocab_size."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def is_val(index: int, val_fraction: float, val_docs: int | None) -> bool:
    """The split rule, by the document's position in the stream (0, 1, ...), so it needs no total count.

    With val_docs: the first val_docs documents. Else a document is in val when a hash of its index, read as a
    number in [0, 1), is below val_fraction: about that fraction, spread over the corpus, the same on every run.
    """
    if val_docs is not None:
        return index < val_docs
    digest = hashlib.blake2b(index.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2.0**64


def prepare(documents: Iterable[str], tokenizer_path: str, out_dir: str, *, val_fraction: float = 0.01,
            val_docs: int | None = None, overwrite: bool = False, sources: list[str] | None = None,
            source_stats: dict | None = None, batch_bytes: int = 1 << 20, progress: bool = True) -> dict:
    """Tokenize documents into out_dir (train.bin, val.bin, meta.json) and return the meta.

    Nothing in out_dir changes before the inputs are checked (tokenizer, at least one document, writable folder,
    no complete data there unless overwrite). With overwrite, the old meta.json goes first, so that an interrupted
    run leaves a folder no reader accepts. source_stats: the stats dict of corpus.iter_documents, for the
    replaced-bytes count. Memory stays bounded: batches of about batch_bytes of text are encoded and appended.
    """
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction must be in [0, 1), got {val_fraction}")
    if val_docs is not None and val_docs < 0:
        raise UserError(f"--val_docs must be >= 0, got {val_docs}")
    tok = common.load_tokenizer(tokenizer_path)
    tok.no_padding()
    tok.no_truncation()
    tokenizer_sha = common.sha256_file(tokenizer_path)
    vocab_size = tok.get_vocab_size()
    sources = list(sources or [])

    common.check_writable_folder(out_dir)
    meta_path = os.path.join(out_dir, META)
    if os.path.exists(meta_path) and not overwrite:
        try:
            recorded = _read_json(meta_path).get("tokenizer_sha256")
        except UserError as e:  # unreadable meta: still refuse, the user decides
            raise UserError(f"{e}; pass --overwrite to replace the data in {out_dir}") from None
        why = (f"made by a different tokenizer (recorded sha256 {recorded}, {tokenizer_path} has {tokenizer_sha})"
               if recorded != tokenizer_sha else "made with this tokenizer")
        raise UserError(f"{out_dir} already holds complete data, {why}; pass --overwrite to replace it")
    documents = iter(documents)
    first = next(documents, None)
    if first is None:
        raise UserError(f"no documents in {', '.join(sources[:3]) or 'the input'}")

    common.make_folder(out_dir)
    if os.path.exists(meta_path):  # overwrite: the folder must stop counting as complete before any .bin changes
        os.remove(meta_path)
        common.fsync_dir(out_dir)
    for name in os.listdir(out_dir):  # left by a killed run
        if re.fullmatch(r"(train|val)\.bin\.tmp\.\d+", name):
            os.remove(os.path.join(out_dir, name))
    start = time.time()
    counts, text_bytes = _write_splits(tok, itertools.chain([first], documents), out_dir, token_dtype(vocab_size),
                                       val_fraction, val_docs, batch_bytes, progress)
    seconds = time.time() - start
    meta = {
        "format": FORMAT,
        "vocab_size": vocab_size,
        "special_ids": {t: tok.token_to_id(t) for t in SPECIAL_TOKENS},
        "dtype": token_dtype(vocab_size).name,
        "tokenizer_sha256": tokenizer_sha,
        "splits": counts,
        "sources": sources,
        "split_rule": {"val_docs": val_docs} if val_docs is not None else {"val_fraction": val_fraction},
        "stats": {"text_bytes": text_bytes, "seconds": round(seconds, 3),
                  "replaced_bytes": (source_stats or {}).get("replaced_bytes", 0)},
    }
    common.fsync_dir(out_dir)
    common.atomic_write_json(meta_path, meta)
    common.fsync_dir(out_dir)
    return meta


def _write_splits(tok, documents: Iterator[str], out_dir: str, dtype, val_fraction: float, val_docs: int | None,
                  batch_bytes: int, progress: bool) -> tuple[dict, int]:
    """Encode the documents into out_dir/{train,val}.bin (written under temporary names, fsynced, renamed).
    -> ({split: {"tokens", "docs"}}, bytes of text read)."""
    tmp = {s: os.path.join(out_dir, f"{s}.bin.tmp.{os.getpid()}") for s in SPLITS}
    counts = {s: {"tokens": 0, "docs": 0} for s in SPLITS}
    start = time.time()
    text_bytes = 0
    files = {}
    try:
        for s in SPLITS:
            files[s] = open(tmp[s], "wb")
        # Three stages overlap: reading (a thread), encoding (a thread; Rayon uses all cores and releases the GIL)
        # and, here, splitting and writing.
        batches = _in_thread(_batches(documents, batch_bytes), depth=2)
        index = 0
        with contextlib.closing(_in_thread(_encode(tok, batches), depth=1)) as encoded, \
                tqdm(desc="tokenizing", unit="B", unit_scale=True, unit_divisor=1000, disable=not progress) as bar:
            for encodings, nbytes in encoded:
                ids = {s: [] for s in SPLITS}
                for enc in encodings:
                    split = "val" if is_val(index, val_fraction, val_docs) else "train"
                    ids[split] += enc.ids
                    ids[split].append(SEP_ID)
                    counts[split]["docs"] += 1
                    index += 1
                for s in SPLITS:
                    files[s].write(np.array(ids[s], dtype=dtype).tobytes())
                    counts[s]["tokens"] += len(ids[s])
                text_bytes += nbytes
                tokens = counts["train"]["tokens"] + counts["val"]["tokens"]
                bar.set_postfix_str(f"{tokens / 1e6:.1f}M tokens, {tokens / (time.time() - start) / 1e3:.0f}k tok/s",
                                    refresh=False)
                bar.update(nbytes)
        if counts["train"]["docs"] == 0:
            raise UserError(f"all {index} documents went to val; lower --val_docs / --val_fraction")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
        for s in SPLITS:
            os.replace(tmp[s], os.path.join(out_dir, f"{s}.bin"))
    except OSError as e:
        raise UserError(f"I/O error while making {out_dir}: {e.strerror or e}") from None
    finally:
        for f in files.values():
            f.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return counts, text_bytes


def _batches(documents: Iterator[str], batch_bytes: int) -> Iterator[tuple[list[str], int]]:
    """Documents grouped into batches of about batch_bytes of UTF-8 text: (docs, bytes)."""
    batch, nbytes = [], 0
    for doc in documents:
        batch.append(doc)
        nbytes += len(doc.encode("utf-8"))
        if nbytes >= batch_bytes:
            yield batch, nbytes
            batch, nbytes = [], 0
    if batch:
        yield batch, nbytes


def _encode(tok, batches: Iterator[tuple[list[str], int]]) -> Iterator[tuple[list, int]]:
    with contextlib.closing(batches):
        for docs, nbytes in batches:
            yield tok.encode_batch_fast(docs, add_special_tokens=False), nbytes  # all cores (Rayon)


def _in_thread(items: Iterator, depth: int) -> Iterator:
    """The same items, produced by a thread up to depth ahead of the caller; its exceptions re-raised here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
            else:
                put(done)
        except BaseException as e:  # handed to the consumer
            put(e)
        finally:
            if hasattr(items, "close"):
                items.close()  # stops an upstream _in_thread too

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} is not a data.py meta file")
    return obj


def load_meta(data_dir: str, tokenizer_sha256: str | None = None, vocab_size: int | None = None) -> dict:
    """The meta of a complete data folder; UserError if incomplete, inconsistent, or made by another tokenizer
    (one whose sha256 is not tokenizer_sha256, or whose vocabulary size is not vocab_size)."""
    if not os.path.isdir(data_dir):
        if os.path.exists(data_dir):
            raise UserError(f"{data_dir} is a file, not a data folder made by data.py")
        raise UserError(f"data folder not found: {data_dir} (make it with: python data.py --out {data_dir})")
    meta_path = os.path.join(data_dir, META)
    if not os.path.isfile(meta_path):
        raise UserError(f"{data_dir} holds no complete data (no {META}); make it with: "
                        f"python data.py --tokenizer tokenizer.json --out {data_dir}")
    meta = _read_json(meta_path)
    try:
        if meta["format"] != FORMAT:
            raise UserError(f"{meta_path} has format {meta['format']}, this code reads format {FORMAT}")
        _check_count(meta_path, "vocab_size", meta["vocab_size"])
        if meta["dtype"] != token_dtype(meta["vocab_size"]).name:
            raise UserError(f"{meta_path}: dtype {meta['dtype']!r} is not the one data.py uses for vocab_size "
                            f"{meta['vocab_size']} ({token_dtype(meta['vocab_size']).name})")
        itemsize = np.dtype(meta["dtype"]).itemsize
        for s in SPLITS:
            path, tokens = os.path.join(data_dir, f"{s}.bin"), meta["splits"][s]["tokens"]
            _check_count(meta_path, f"splits.{s}.tokens", tokens)
            size = os.path.getsize(path) if os.path.isfile(path) else None
            if size != tokens * itemsize:
                raise UserError(f"{path} is missing or has {size} bytes, {META} says {tokens * itemsize}; "
                                "rerun data.py with --overwrite")
        recorded = meta["tokenizer_sha256"]
    except (KeyError, TypeError) as e:
        raise UserError(f"{meta_path} is not a data.py meta file (bad or missing {e})") from None
    if tokenizer_sha256 is not None and recorded != tokenizer_sha256:
        raise UserError(f"{data_dir} was made by a different tokenizer: sha256 {recorded} in {META}, "
                        f"{tokenizer_sha256} given; rerun data.py with this tokenizer")
    if vocab_size is not None and meta["vocab_size"] != vocab_size:
        raise UserError(f"{meta_path} says vocab_size {meta['vocab_size']}, the tokenizer has {vocab_size} tokens; "
                        "rerun data.py with --overwrite")
    return meta


def _check_count(meta_path: str, name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UserError(f"{meta_path}: {name} is {value!r}, not a whole number; rerun data.py with --overwrite")


def find_bad_ids(tokens: np.ndarray, vocab_size: int, sample: bool = False, bar=None,
                 chunk: int = 1 << 24) -> tuple[int, int, int] | None:
    """Ids that no token of the vocabulary has (>= vocab_size) in a token file's memmap: None, or (how many, the
    first one's position, its value). sample: only 64 blocks of 4096 tokens spread over the file (start-up).
    bar: a tqdm bar advanced by the tokens read."""
    block = 4096 if sample else chunk
    starts = (np.unique(np.linspace(0, max(len(tokens) - block, 0), 64).astype(np.int64)) if sample
              else range(0, len(tokens), chunk))
    count, first = 0, None
    for start in starts:
        part = np.asarray(tokens[start:start + block])
        bad = np.flatnonzero(part >= vocab_size)
        if len(bad):
            count += len(bad)
            first = first or (int(start + bad[0]), int(part[bad[0]]))
        if bar is not None:
            bar.update(len(part))
    return None if first is None else (count, *first)


def bad_ids_message(path: str, vocab_size: int, found: tuple[int, int, int], sampled: bool) -> str:
    count, position, value = found
    return (f"{path} holds token id {value} at position {position}, not below the vocabulary size {vocab_size}"
            + (f" ({count} such ids{' in a sample' if sampled else ''})" if count > 1 else "")
            + ": the file is damaged or was made with another tokenizer; check it with python data.py --verify "
              f"--out {os.path.dirname(path) or '.'} --tokenizer TOKENIZER, remake it with --overwrite")


def verify(data_dir: str, tokenizer_path: str, progress: bool = True) -> dict:
    """Check a data folder fully: meta.json, the files' sizes, the tokenizer it was made with, and every token id
    below the vocabulary size. -> its meta; UserError naming the first problem."""
    tok = common.load_tokenizer(tokenizer_path)
    meta = load_meta(data_dir, common.sha256_file(tokenizer_path), tok.get_vocab_size())
    for split in SPLITS:
        path, count = os.path.join(data_dir, f"{split}.bin"), meta["splits"][split]["tokens"]
        if count == 0:
            continue
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r", shape=(count,))
        with tqdm(total=count, unit="tok", unit_scale=True, desc=f"verifying {split}.bin",
                  disable=None if progress else True) as bar:
            found = find_bad_ids(tokens, meta["vocab_size"], bar=bar)
        if found:
            raise UserError(bad_ids_message(path, meta["vocab_size"], found, sampled=False))
    return meta


class TokenReader:
    """Random contiguous windows of one split, deterministic in (seed, step): a resumed run sees the same batches."""

    def __init__(self, data_dir: str, split: str, seq_len: int, seed: int, tokenizer_sha256: str | None = None,
                 vocab_size: int | None = None):
        self.meta = load_meta(data_dir, tokenizer_sha256, vocab_size)
        if split not in self.meta["splits"]:
            raise UserError(f"no split {split!r} in {data_dir}; there are {', '.join(self.meta['splits'])}")
        if seq_len < 1 or seed < 0:
            raise UserError(f"need seq_len >= 1 and seed >= 0, got seq_len={seq_len}, seed={seed}")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.num_tokens = int(self.meta["splits"][split]["tokens"])
        self.vocab_size = int(self.meta["vocab_size"])
        if self.num_tokens < seq_len + 1:
            raise UserError(f"split {split} of {data_dir} has {self.num_tokens} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; use more documents or a shorter sequence")
        path = os.path.join(data_dir, f"{split}.bin")
        self.tokens = np.memmap(path, dtype=self.meta["dtype"], mode="r", shape=(self.num_tokens,))
        if found := find_bad_ids(self.tokens, self.vocab_size, sample=True):  # a cheap look before any work
            raise UserError(bad_ids_message(path, self.vocab_size, found, sampled=True))

    def batch(self, step: int, batch_size: int, seq_len: int | None = None) -> np.ndarray:
        """[batch_size, T] int32 windows (T = seq_len, default the reader's) starting at offsets drawn from
        default_rng([seed, step])."""
        T = seq_len or self.seq_len
        if not 1 <= T <= self.num_tokens - 1:
            raise UserError(f"windows of {T} tokens do not fit split {self.split} ({self.num_tokens} tokens)")
        rng = np.random.default_rng([self.seed, step])
        offsets = rng.integers(0, self.num_tokens - T + 1, size=batch_size)  # [B]
        return self.tokens[offsets[:, None] + np.arange(T)].astype(np.int32)  # [B, T]


def main() -> None:
    p = common.ArgumentParser(__doc__)
    p.add_argument("--tokenizer", default="tokenizer.json",
                   help="tokenizer made by tokenizer.py (default: tokenizer.json)")
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--overwrite", action="store_true", help="replace complete data already in --out")
    p.add_argument("--verify", action="store_true",
                   help="write nothing: check the data in --out fully (meta.json, file sizes, made with --tokenizer, "
                        "every token id below its vocabulary size) and exit")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val_fraction", type=common.float_in(0, 1, open_high=True), default=0.01,
                     help="put about this fraction of documents in val: document number i (0, 1, ... in reading "
                          "order) goes to val when a hash of i falls below the fraction; the same on every run "
                          "(default: 0.01)")
    val.add_argument("--val_docs", type=common.non_negative_int,
                     help="instead, put exactly the first N documents in val")
    p.add_argument("--batch_mb", type=common.positive_float, default=1.0,
                   help="MB of text encoded per batch: larger keeps cores busier, smaller uses less memory "
                        "(default: 1)")
    corpus.add_source_args(p)
    args = p.parse_args()

    if args.verify:
        meta = verify(args.out, args.tokenizer)
        print(f"verified {args.out}: " + ", ".join(f"{s} {meta['splits'][s]['tokens']} tokens" for s in SPLITS)
              + f", every id below {meta['vocab_size']}, made with {args.tokenizer}")
        return
    stats: dict = {}
    documents = corpus.documents_from_args(args, stats)
    meta = prepare(documents, args.tokenizer, args.out, val_fraction=args.val_fraction, val_docs=args.val_docs,
                   overwrite=args.overwrite, sources=stats["sources"], source_stats=stats,
                   batch_bytes=max(1, int(args.batch_mb * 1e6)))
    sp, st = meta["splits"], meta["stats"]
    tokens = sp["train"]["tokens"] + sp["val"]["tokens"]
    print(f"wrote {args.out}: train {sp['train']['docs']} docs {sp['train']['tokens']} tokens, "
          f"val {sp['val']['docs']} docs {sp['val']['tokens']} tokens ({meta['dtype']}); "
          f"{st['text_bytes'] / 1e6:.1f} MB in {st['seconds']:.1f} s = "
          f"{st['text_bytes'] / 1e6 / st['seconds']:.2f} MB/s, "
          f"{tokens / st['seconds'] / 1e3:.0f}k tokens/s; {st['replaced_bytes']} undecodable bytes replaced")
    if sp["val"]["tokens"] < VAL_TOKENS_NEEDED:
        print(f"warning: val has {sp['val']['docs']} documents, {sp['val']['tokens']} tokens: fewer than the "
              f"{VAL_TOKENS_NEEDED} that train.py's evaluation needs at its default --seq_len (train.py then "
              f"refuses this data unless --eval_windows 0); raise --val_fraction or --val_docs, or add documents",
              file=sys.stderr)


if __name__ == "__main__":
    common.run_main(main)
