"""Where documents come from, for tokenizer.py and data.py: local files (plain text, JSON lines, WikiExtractor
output) or a dataset streamed from the Hugging Face Hub. Every reader yields non-empty strings and fills in a stats
dict (docs, bytes, replaced_bytes, sources) as it goes.
"""
import glob
import itertools
import json
import os
import re
import socket
import urllib.parse
from typing import Iterator

import common
from common import UserError, first_line


DEFAULT_HUB_DOCS = 10000  # the quick start's slice of Wikipedia (local files are read whole by default)
DEFAULT_HF_DATASET, DEFAULT_HF_CONFIG, DEFAULT_HF_SPLIT = "wikimedia/wikipedia", "20231101.en", "train"
FORMATS = ("auto", "text", "jsonl", "wikiextractor")
MAX_LINE_BYTES = 64 << 20  # a longer line is an error: a file without newlines would fill memory


def add_source_args(parser) -> None:
    """Add the document-source flags that tokenizer.py and data.py share."""
    g = parser.add_argument_group("corpus (local files, or the Hugging Face Hub when --text_files is not given)")
    g.add_argument("--text_files", nargs="+", metavar="GLOB",
                   help="local corpus files (globs, ** allowed). Plain text: each non-empty line is a document. "
                        "JSON lines: one object per line, its 'text' field is a document. WikiExtractor output: "
                        "each <doc> block is a document (title line dropped, title-only docs skipped). A line "
                        f"longer than {MAX_LINE_BYTES >> 20} MiB is an error. Regular files only: not pipes, "
                        "sockets or devices. "
                        "Without this flag the corpus streams from the Hub (see --hf_dataset).")
    g.add_argument("--format", default="auto", choices=FORMATS,
                   help="format of --text_files; auto sniffs each file's first line "
                        "('<doc ' = wikiextractor, '{' = jsonl, else text) (default: auto)")
    g.add_argument("--num_docs", type=common.non_negative_int,
                   help=f"use at most this many documents; 0 = all (default: all of --text_files, the first "
                        f"{DEFAULT_HUB_DOCS} from the Hub)")
    g.add_argument("--hf_dataset", default=DEFAULT_HF_DATASET,
                   help=f"Hub dataset streamed when no --text_files are given (default: {DEFAULT_HF_DATASET})")
    g.add_argument("--hf_config", default=DEFAULT_HF_CONFIG, help=f"its config (default: {DEFAULT_HF_CONFIG})")
    g.add_argument("--hf_split", default=DEFAULT_HF_SPLIT, help=f"its split (default: {DEFAULT_HF_SPLIT})")


def documents_from_args(args, stats: dict):
    """iter_documents() configured by the flags of add_source_args()."""
    return iter_documents(args.text_files, fmt=args.format, num_docs=args.num_docs, hf_dataset=args.hf_dataset,
                          hf_config=args.hf_config, hf_split=args.hf_split, stats=stats)


def iter_documents(text_files=None, fmt: str = "auto", num_docs: int | None = None,
                   hf_dataset: str = DEFAULT_HF_DATASET, hf_config: str | None = DEFAULT_HF_CONFIG,
                   hf_split: str = DEFAULT_HF_SPLIT, stats: dict | None = None) -> Iterator[str]:
    """Documents (non-empty strings) from local files (text_files: globs) or, when none are given, from the Hub.

    Mistakes are found at call time, before any document is read: a glob matching nothing, a path that is not a
    readable file, an unreachable Hub. num_docs: at most this many (0 = all; None = all local files, or the first
    DEFAULT_HUB_DOCS from the Hub). Undecodable bytes are replaced by U+FFFD, never fatal. If stats (a dict) is
    given it is filled in as reading goes: docs, bytes (of text read), replaced_bytes, sources (list of names).
    """
    if num_docs is None:
        num_docs = 0 if text_files else DEFAULT_HUB_DOCS
    if num_docs < 0:
        raise UserError(f"--num_docs must be >= 0 (0 = all), got {num_docs}")
    stats = {} if stats is None else stats
    stats.update(docs=0, bytes=0, replaced_bytes=0)
    if text_files:
        paths = resolve_text_files(text_files)
        stats["sources"] = paths
        docs = (doc for path in paths for doc in _read_file(path, fmt, stats))
    else:
        check_hub_reachable()
        stats["sources"] = [f"hf:{hf_dataset}" + (f"/{hf_config}" if hf_config else "") + f"[{hf_split}]"]
        docs = _read_hub(hf_dataset, hf_config, hf_split, stats)
    return _counted(itertools.islice(docs, num_docs or None), stats)


def require_documents(documents: Iterator[str], stats: dict) -> Iterator[str]:
    """The same documents, after checking (by reading the first) that there is at least one."""
    first = next(documents, None)
    if first is None:
        sources = stats["sources"]
        raise UserError(f"no documents in {', '.join(sources[:3])}" +
                        (f" and {len(sources) - 3} more" if len(sources) > 3 else ""))
    return itertools.chain([first], documents)


def _counted(docs, stats: dict) -> Iterator[str]:
    for doc in docs:
        stats["docs"] += 1
        yield doc


def resolve_text_files(patterns) -> list[str]:
    """Expand globs (sorted, duplicates dropped); each must match something and each match be a readable file."""
    paths: dict[str, None] = {}  # ordered set
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        if not matches:
            raise UserError(f"no files match {pattern!r}")
        paths.update(dict.fromkeys(matches))
    for path in paths:
        if os.path.isdir(path):
            raise UserError(f"{path} is a directory, not a text file (use a glob such as {path}/*)")
        if os.path.exists(path) and not os.path.isfile(path):  # a FIFO would block open(), a device never end
            raise UserError(f"{path} is not a regular file (a pipe, socket or device); save the text to a file")
        try:
            open(path, "rb").close()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    return list(paths)


_BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark some editors put first; not text
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # what surrogateescape makes of each byte that is not UTF-8


def _decode(raw: bytes, stats: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text, n = _UNDECODABLE.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
        stats["replaced_bytes"] += n
        return text


def sniff_format(path: str) -> str:
    """'wikiextractor' if the first non-blank line starts with '<doc ', 'jsonl' if with '{', else 'text'."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    if head.startswith(b"<doc "):
        return "wikiextractor"
    return "jsonl" if head.startswith(b"{") else "text"


def _read_file(path: str, fmt: str, stats: dict) -> Iterator[str]:
    fmt = sniff_format(path) if fmt == "auto" else fmt
    reader = {"text": _text_docs, "jsonl": _jsonl_docs, "wikiextractor": _wikiextractor_docs}[fmt]
    try:
        with open(path, "rb") as f:
            yield from reader(path, _lines(f, stats))
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _lines(f, stats: dict) -> Iterator[str]:
    for n, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b"")):  # b"\n" is never in a UTF-8 char
        if len(raw) > MAX_LINE_BYTES:
            raise UserError(f"{f.name}:{n + 1}: line longer than {MAX_LINE_BYTES / 2**20:g} MiB, the limit; "
                            "is this a text corpus?")
        stats["bytes"] += len(raw)
        yield _decode(raw.removeprefix(_BOM) if n == 0 else raw, stats).rstrip("\r\n")


def _text_docs(path: str, lines) -> Iterator[str]:
    for line in lines:
        if line.strip():
            yield line


def _jsonl_docs(path: str, lines) -> Iterator[str]:
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (ValueError, TypeError, KeyError):
            raise UserError(f"{path}:{n}: not a JSON object with a 'text' field (try --format text)") from None
        if not isinstance(text, str):
            raise UserError(f"{path}:{n}: the 'text' field is not a string")
        if text.strip():
            yield text


def _wikiextractor_docs(path: str, lines) -> Iterator[str]:
    body: list[str] | None = None  # lines of the open <doc> block, title line first; None outside a block
    start = 0
    for n, line in enumerate(lines, 1):
        if body is None:
            if line.startswith("<doc ") or line == "<doc>":
                body, start = [], n
            elif line.strip():
                raise UserError(f"{path}:{n}: text outside a <doc> block; is this WikiExtractor output?")
        elif line == "</doc>":
            text = "\n".join(s for s in body[1:] if s.strip())
            if text:
                yield text
            body = None
        else:
            body.append(line)
    if body is not None:
        raise UserError(f"{path}:{start}: <doc> block without </doc> (truncated file?)")


def check_hub_reachable(timeout: float = 3.0) -> None:
    """Fail at once, with the way out, when the Hub cannot be reached (load_dataset would retry for ~25 s).

    Skipped in offline mode (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), where datasets itself answers from its cache.
    The host is that of HF_ENDPOINT (as in huggingface_hub), default https://huggingface.co.
    """
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in offline):
        return
    url = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach the Hugging Face Hub at {host}:{port} ({e.strerror or e}); "
                        "use local files instead: --text_files 'corpus/*.txt' (plain text, .jsonl or WikiExtractor "
                        "output)") from None


def _read_hub(name: str, config: str | None, split: str, stats: dict) -> Iterator[str]:
    import datasets  # slow import (~1 s): only when streaming from the Hub

    try:
        for row in datasets.load_dataset(name, config, split=split, streaming=True):
            text = row.get("text")
            if not isinstance(text, str):
                raise UserError(f"Hub dataset {name} has no string 'text' field (fields: {', '.join(row)})")
            stats["bytes"] += len(text.encode("utf-8"))
            if text.strip():
                yield text
    except UserError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError, ...)
        raise UserError(f"cannot stream Hub dataset {name} ({config}, {split}): {first_line(e)}") from None
