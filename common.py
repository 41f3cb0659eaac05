"""Helpers that more than one script needs: user errors, flag domains, atomic writes, the tokenizer contract."""
import argparse
import errno
import hashlib
import json
import math
import os
import re
import shutil
import sys
from contextlib import contextmanager
from typing import Callable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))


class UserError(Exception):
    """A mistake in the user's input (bad path, bad flag, wrong file): one line on stderr, exit code 2."""


def first_line(e: BaseException) -> str:
    """An exception as one line for a UserError message: its first line, or its type when it has no text."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def run_main(main: Callable[[], None]) -> None:
    """Run a script's main(), turning a UserError into a one-line message and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------------
# Flags: every script's parser and the domains of its values, in one place

# jax.random.PRNGKey keeps a seed's low 32 bits (without jax_enable_x64), so a larger seed would repeat a smaller
# one's numbers, and one of 2**63 or more does not convert at all.
MAX_SEED = 2**32 - 1


class ArgumentParser(argparse.ArgumentParser):
    """Every script's parser. A bad flag (argparse's own type, choice and usage errors, and the domains of the
    types below) is one line `error: ...` on stderr and exit code 2, like a UserError under run_main; --help still
    prints the whole usage."""

    def __init__(self, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(description=description, **kwargs)

    def error(self, message: str):
        print(f"error: {flag_message(message)}", file=sys.stderr)
        sys.exit(2)


_ARGPARSE_TYPES = {"int": "an integer", "float": "a number", "parse_count": "a count"}


def flag_message(message: str) -> str:
    """argparse's "argument --x: ..." as "--x ..." on one line; its own "invalid int value: 'v'" says what is
    allowed."""
    found = re.fullmatch(r"argument ([^:]+): (.*)", message, re.S)
    if not found:
        return " ".join(message.split())
    flag, text = found.groups()
    invalid = re.fullmatch(r"invalid (\w+) value: (.*)", text, re.S)
    if invalid and invalid[1] in _ARGPARSE_TYPES:
        text = f"must be {_ARGPARSE_TYPES[invalid[1]]}, got {invalid[2]}"
    elif text == "expected one argument" and flag.startswith("--"):  # argparse takes "-1e-3" for a flag
        text += f" (a value starting with '-' is written {flag}=VALUE, e.g. {flag}=-1e-3)"
    return " ".join(f"{flag}{'' if text.startswith('must') else ':'} {text}".split())


def _range(low, high, open_low: bool = False, open_high: bool = False) -> str:
    """' in [0, 1)', ' >= 1', ' > 0' or '' (unbounded)."""
    if low is not None and high is not None:
        return f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    if low is not None:
        return f" {'>' if open_low else '>='} {low}"
    if high is not None:
        return f" {'<' if open_high else '<='} {high}"
    return ""


def int_in(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (None: no bound on that side)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer{_range(low, high)}, got {text!r}")
        return value
    return parse


def float_in(low: float | None = None, high: float | None = None, *, open_low: bool = False,
             open_high: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number between low and high (None: no bound), each end closed unless open_*."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (math.isfinite(value) and (low is None or (value > low if open_low else value >= low))
                  and (high is None or (value < high if open_high else value <= high)))
        if not inside:
            what = _range(low, high, open_low, open_high) or " (finite)"
            raise argparse.ArgumentTypeError(f"must be a number{what}, got {text!r}")
        return value
    return parse


positive_int = int_in(1)
non_negative_int = int_in(0)
seed = int_in(0, MAX_SEED)
finite_float = float_in()
positive_float = float_in(0, open_low=True)
non_negative_float = float_in(0)
fraction = float_in(0, 1)  # [0, 1]


# ----------------------------------------------------------------------------------------------------------------

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# What a disk, not the code, does wrong: a read-only file system or folder, a full disk or quota, a file too big.
DISK_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@contextmanager
def writing(path: str):
    """Around the writing of an output: an OSError of DISK_ERRNOS becomes a one-line UserError naming path and the
    cause; any other OSError propagates as it is (a bug, not the user's disk)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_ERRNOS:
            raise
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def check_writable_folder(folder: str) -> None:
    """An output folder, existing or to be made, checked before any work: the nearest part of its path that exists
    must be a folder this process may write in."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"cannot use {folder} as output folder: {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        cause = "a read-only file system" if os.statvfs(path).f_flag & os.ST_RDONLY else "no write permission"
        raise UserError(f"cannot write to output folder {folder}: {path} is not writable ({cause})")


def make_folder(folder: str) -> None:
    """os.makedirs(folder, exist_ok=True), with disk errors as UserErrors."""
    with writing(folder):
        os.makedirs(folder, exist_ok=True)


def _write_tmp(path: str, data: bytes) -> str:
    """data in a temporary name beside path, fsynced; -> that name (removed again if writing fails)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return tmp


def atomic_write_files(files: dict[str, bytes]) -> None:
    """Write several files all or none: each to a temporary name first (a full disk fails here, changing nothing),
    then every one renamed into place in the order given."""
    tmps: dict[str, str] = {}
    try:
        for path, data in files.items():
            with writing(path):
                tmps[path] = _write_tmp(path, data)
        for path, tmp in tmps.items():
            with writing(path):
                os.replace(tmp, path)
    finally:
        for tmp in tmps.values():
            if os.path.exists(tmp):
                os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers see old or new, never half.
    A full disk or a read-only folder is a UserError, and the old file stays."""
    atomic_write_files({path: data})


def fsync_dir(path: str) -> None:
    """Make renames inside a folder durable: fsync the folder itself."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: str, tmp: str):
    """Build a folder under the name tmp (yielded), then fsync it and rename it to final; on any failure, tmp is
    removed and final is untouched, so a reader never sees a half-written folder. An existing final is replaced:
    moved aside, the new one renamed in, then the old one removed. Disk errors become a UserError naming final."""
    old = f"{tmp}.old"
    with writing(final):
        try:
            os.makedirs(tmp)
            yield tmp
            fsync_dir(tmp)
            if os.path.isdir(final):  # a rename cannot replace a folder that is not empty
                os.rename(final, old)
            os.rename(tmp, final)
            fsync_dir(os.path.dirname(os.path.abspath(final)))
        except BaseException:
            if os.path.isdir(old) and not os.path.exists(final):
                os.rename(old, final)
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    shutil.rmtree(old, ignore_errors=True)


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def check_new_file(path: str, overwrite: bool) -> None:
    """An output file: its folder must exist, and the file must be new unless overwrite (every script's rule)."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")


def load_tokenizer(path: str):
    """Load a tokenizer.json made by tokenizer.py; a missing, corrupt or foreign file is a UserError."""
    from tokenizers import Tokenizer

    if not os.path.isfile(path):
        raise UserError(f"tokenizer file not found: {path} (train one with: python tokenizer.py --out {path})")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:
        raise UserError(f"cannot read tokenizer {path}: {first_line(e)}") from None
    for want_id, token in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(token) != want_id:
            raise UserError(f"tokenizer {path} does not have {token} at id {want_id}; was it made by tokenizer.py?")
    return tok
