"""Shared fixtures: a tiny synthetic corpus and a tokenizer trained on it (seconds, no downloads)."""
import errno
import json
import os
import random
import subprocess

import jax
import pytest

# The float32 reference checks need float32 matmuls; on a GPU XLA would use TF32 (about 1e-3 off). No-op on CPU.
jax.config.update("jax_default_matmul_precision", "highest")

_WORDS = ("the of and to in was is for on that with as by at from his her it an are were be this which or "
          "river city school music player team season history village station church family language game "
          "government university album island county national world country population film party war "
          "district company league professional national international").split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """n documents of 1-4 sentences of common words, deterministic in seed."""
    rng = random.Random(seed)
    return [" ".join(" ".join(rng.choices(_WORDS, k=rng.randint(3, 12))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return make_docs(200)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory, tiny_docs) -> str:
    from tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(train_tokenizer(tiny_docs, vocab_size=200).to_str())
    return str(path)


def damage_checkpoint(folder: str, fault: str) -> None:
    """Damage a checkpoint folder as disks, copies and hands do: "truncate" (arrays.npz loses its second half),
    "bitflip" (one byte of arrays.npz inverted), "empty_state" (state.json becomes {}); manifest.json's "files"
    made [] or null, or its arrays.npz record a string; or, with manifest.json deleted ("no_manifest"), state.json
    without "step", with step "abc", a list or an int, or arrays.npz deleted too."""
    manifest, state = os.path.join(folder, "manifest.json"), os.path.join(folder, "state.json")
    if fault.startswith("manifest_"):
        files = json.load(open(manifest))["files"]
        files = {"manifest_files_empty_list": [], "manifest_files_null": None,
                 "manifest_entry_a_string": {**files, "arrays.npz": "arrays.npz"}}[fault]
        with open(manifest, "w") as f:
            json.dump({"files": files}, f)
        return
    if fault.startswith(("state_", "no_manifest")):
        os.remove(manifest)
        saved = json.load(open(state))
        content = {"state_without_step": {k: v for k, v in saved.items() if k != "step"},
                   "state_step_abc": {**saved, "step": "abc"}, "state_a_list": [saved], "state_an_int": 7}.get(fault)
        if content is not None:
            with open(state, "w") as f:
                json.dump(content, f)
        if fault == "no_manifest_no_arrays":
            os.remove(os.path.join(folder, "arrays.npz"))
        return
    path = state if fault == "empty_state" else os.path.join(folder, "arrays.npz")
    data = bytearray(open(path, "rb").read())
    if fault == "truncate":
        data = data[:len(data) // 2]
    elif fault == "bitflip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"{}")
    with open(path, "wb") as f:
        f.write(data)


class Mounts:
    """Small tmpfs mounts for the read-only and full-disk cases (root only); unmount_all undoes them. Where mount
    is not allowed, tmpfs() returns False and `error` says why, and the tests that need one skip."""

    def __init__(self):
        self.paths: list[str] = []
        self.error: str | None = None if os.geteuid() == 0 else "mounting a tmpfs needs root"

    def tmpfs(self, path: str, size: str) -> bool:
        if self.error:
            return False
        os.makedirs(path, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path], capture_output=True,
                              text=True)
        if done.returncode:
            self.error = f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"
            return False
        self.paths.append(path)
        return True

    def read_only(self, path: str) -> None:
        """A mounted tmpfs, read-only from now on (chmod would not stop root)."""
        subprocess.run(["mount", "-o", "remount,ro", path], check=True)

    def unmount_all(self) -> None:
        for path in reversed(self.paths):
            subprocess.run(["umount", path], capture_output=True)
            if os.path.ismount(path):
                subprocess.run(["umount", "-l", path], capture_output=True)
        self.paths.clear()


@pytest.fixture(scope="module")
def mounts():
    m = Mounts()
    yield m
    m.unmount_all()


def fill_disk(folder: str, leave: int = 0) -> str:
    """Fill the file system of folder with one file, then give `leave` bytes of it back; -> the file."""
    path = os.path.join(folder, "filler")
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
        if leave:
            f.truncate(max(0, f.tell() - leave))
    return path
