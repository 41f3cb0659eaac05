"""bench_parity.py's comparison, 5 steps on the shape of tests/data/hf_tiny_bert: train.py's own step and optimiser
against the model hf.py exports, trained by transformers + torch.optim.AdamW on the same masked inputs. Skipped
unless torch and transformers are installed (test-only extras), like the export parity tests in test_hf.py."""
import dataclasses
import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf  # noqa: E402
from common import CLS_ID, SEP_ID  # noqa: E402
from model import NUM_SPECIAL  # noqa: E402

FIXTURE = os.path.join(ROOT, "tests", "data", "hf_tiny_bert")
HAVE_TORCH = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="needs torch and transformers (test-only extras)")


@needs_torch
@pytest.mark.parametrize("post_ln", [True, False], ids=["post_ln", "pre_ln"])
def test_train_step_matches_transformers_with_torch_adamw(post_ln):
    import bench_parity

    cfg = dataclasses.replace(hf.read_config(FIXTURE)[0], dropout=0.0, post_ln=post_ln)  # L2 H32, vocab 106
    tokenizer_bytes, _ = hf.convert_tokenizer(FIXTURE, cfg.vocab_size)  # only for the export: vocab 106
    args = bench_parity.parse_args(["--steps", "5", "--warmup_steps", "1", "--batch_size", "4", "--seq_len", "32",
                                    "--lr", "1e-2"])
    batches = np.random.default_rng(0).integers(NUM_SPECIAL, cfg.vocab_size, (5, 4, 32)).astype(np.int32)  # [N, B, T]
    batches[:, :, 0], batches[:, :, 20] = CLS_ID, SEP_ID  # special tokens, never masked, as in real windows
    lrs = bench_parity.lr_schedule(args)
    assert min(lrs[:4]) > 0  # steps 2-5 follow real updates (a large rate: differences would grow fast)
    curves = bench_parity.compare(cfg, args, tokenizer_bytes, batches, lrs)
    result = bench_parity.verdict(curves["ours"], curves["torch_float32"])
    assert result["first10"] <= 1e-4 and result["grad_norm"] <= 1e-4, result
