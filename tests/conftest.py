"""Shared fixtures: a tiny synthetic corpus and a tokenizer trained on it (seconds, no downloads)."""
import os
import random

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
    """Damage a checkpoint folder as disks and copies do: "truncate" (arrays.npz loses its second half), "bitflip"
    (one byte of arrays.npz inverted) or "empty_state" (state.json becomes {})."""
    path = os.path.join(folder, "state.json" if fault == "empty_state" else "arrays.npz")
    data = bytearray(open(path, "rb").read())
    if fault == "truncate":
        data = data[:len(data) // 2]
    elif fault == "bitflip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = bytearray(b"{}")
    with open(path, "wb") as f:
        f.write(data)
