"""Helpers that more than one script needs: user errors, atomic writes, the tokenizer contract."""
import hashlib
import json
import os
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename: readers see old or new, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
    moved aside, the new one renamed in, then the old one removed."""
    old = f"{tmp}.old"
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


def atomic_write_json(path: str, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


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
