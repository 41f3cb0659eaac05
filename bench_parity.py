"""Step-by-step parity of train.py's training step with an independent implementation: transformers + torch.

    python bench_parity.py                 # pre-LN: ours vs RobertaPreLayerNormForMaskedLM, 200 steps of tiny
    python bench_parity.py --post_ln       # post-LN: ours vs BertForMaskedLM
    python bench_parity.py --f64_reference --out parity.json   # + torch in float64: how far float32 drifts

One initial model, exported with hf.py, is trained twice in float32 with no dropout on the same token windows
(data.py's files and TokenReader) and the same masks: ours with train.py's own optimiser (model.make_optimizer) and
step (make_train_step, which masks inside from a key), and transformers' model with torch.optim.AdamW, weight
decay on the same parameters as model.decay_mask (matrices and embeddings), clip_grad_norm_, the same learning
rate per step, and the same loss: mean cross-entropy over the masked positions (mask_tokens' weights), taken from
the logits transformers decodes at every position, gathered at the masked ones.

Equivalences checked in the installed sources (optax 0.2.8, torch 2.13): optax.adamw(lr=1) times lr is
p - lr*(m_hat / (sqrt(v_hat) + eps) + wd*p), with bias-corrected moments and eps outside the square root; torch's
AdamW is p*(1 - lr*wd) - lr*m_hat / (sqrt(v_hat) + eps): the same. Clipping: optax scales by max_norm/norm when
norm >= max_norm, torch by min(1, max_norm/(norm + 1e-6)): a relative 1e-6/norm smaller step, which Adam's
normalisation all but removes. Goals: per-step loss within 1e-4 relative over the first 10 steps and within 1%
over all steps; the gradient norm at step 1 within 1e-4 relative. torch and transformers are not requirements of
this codebase: pip install torch transformers to run it.
"""
import argparse
import dataclasses
import importlib.util
import os
import sys
import tempfile
import time

import jax
import numpy as np
from jax.sharding import Mesh

import checkpoint
import common
import corpus
import data
import hf
import model as bert
import train
from common import UserError
from tokenizer import train_tokenizer

GOALS = dict(first10=1e-4, all=1e-2, grad_norm=1e-4)  # relative: loss over steps 1-10, loss over all, grad norm


def parse_args(argv=None) -> argparse.Namespace:
    p = common.ArgumentParser(__doc__)
    p.add_argument("--model", default="tiny", choices=list(bert.PRESETS), help="size preset (default: tiny)")
    p.add_argument("--post_ln", action="store_true",
                   help="BERT's post-LN layout, compared with BertForMaskedLM (default: pre-LN, compared with "
                        "RobertaPreLayerNormForMaskedLM)")
    p.add_argument("--steps", type=common.positive_int, default=200, help="training steps (default: 200)")
    p.add_argument("--batch_size", type=common.positive_int, default=8, help="sequences per step (default: 8)")
    p.add_argument("--seq_len", type=common.positive_int, default=128, help="tokens per window (default: 128)")
    p.add_argument("--lr", type=common.positive_float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--warmup_steps", type=common.non_negative_int, default=20,
                   help="linear warmup from 0 to --lr over this many steps, then linear decay to 0 at --steps "
                        "(train.lr_at with steps for tokens) (default: 20)")
    p.add_argument("--weight_decay", type=common.non_negative_float, default=0.01,
                   help="decoupled weight decay (default: 0.01)")
    p.add_argument("--b1", type=common.float_in(0, 1, open_high=True), default=0.9, help="Adam beta1 (default: 0.9)")
    p.add_argument("--b2", type=common.float_in(0, 1, open_high=True), default=0.98, help="Adam beta2 (default: 0.98)")
    p.add_argument("--eps", type=common.positive_float, default=1e-6, help="Adam epsilon (default: 1e-6)")
    p.add_argument("--grad_clip", type=common.non_negative_float, default=1.0,
                   help="global-norm clipping; 0 = none (default: 1.0)")
    p.add_argument("--mask_rate", type=common.float_in(0, 1, open_low=True, open_high=True), default=0.15,
                   help="fraction of positions masked (default: 0.15)")
    p.add_argument("--seed", type=common.seed, default=0, help="seeds init, window offsets and masks (default: 0)")
    p.add_argument("--text_files", nargs="+", default=["../shared/data/wikipedia/AA/*"], metavar="GLOB",
                   help="corpus files, any format data.py reads (default: '../shared/data/wikipedia/AA/*')")
    p.add_argument("--num_docs", type=common.non_negative_int, default=2000,
                   help="use the first this many documents, for the tokenizer and the windows; 0 = all "
                        "(default: 2000)")
    p.add_argument("--tokenizer", help="a tokenizer.json made by tokenizer.py (default: train one on the text)")
    p.add_argument("--vocab_size", type=common.int_in(6), default=2048,
                   help="vocabulary of the tokenizer trained when --tokenizer is not given (default: 2048)")
    p.add_argument("--f64_reference", action="store_true",
                   help="also train the torch copy in float64 and report how far each float32 run drifts from it "
                        "(tells float32 summation-order chaos from a real difference)")
    p.add_argument("--out", help="write the curves and the verdict to this JSON file")
    args = p.parse_args(argv)
    if args.warmup_steps > args.steps:
        raise UserError(f"--warmup_steps {args.warmup_steps} must not exceed --steps {args.steps}")
    return args


def lr_schedule(args) -> list[float]:
    """The learning rate of steps 1..N: train.lr_at counted in steps, linear warmup then linear decay to 0."""
    return [train.lr_at(s, peak=args.lr, max_tokens=args.steps, warmup_frac=args.warmup_steps / args.steps,
                        final_frac=0.0, anneal="linear") for s in range(1, args.steps + 1)]


def make_batches(args, tmp: str) -> tuple[bytes, int, np.ndarray]:
    """(tokenizer.json bytes, vocab size, windows [N, B, T] int32): data.py's files, read by its TokenReader."""
    documents = lambda: corpus.iter_documents(args.text_files, num_docs=args.num_docs)  # noqa: E731
    tokenizer_path = args.tokenizer or os.path.join(tmp, "tokenizer.json")
    if not args.tokenizer:
        common.atomic_write_bytes(tokenizer_path, train_tokenizer(documents(), args.vocab_size).to_str().encode())
    data.prepare(documents(), tokenizer_path, os.path.join(tmp, "data"), val_docs=0, progress=False)
    reader = data.TokenReader(os.path.join(tmp, "data"), "train", args.seq_len, args.seed)
    with open(tokenizer_path, "rb") as f:
        return f.read(), reader.vocab_size, np.stack([reader.batch(s, args.batch_size) for s in range(args.steps)])


def masks_for(train_key, batches: np.ndarray, mask_rate: float, vocab_size: int) -> list[tuple]:
    """Each step's (inputs [B, T], positions [B, M], targets [B, M], weights [B, M]) as numpy, from the key that
    train.make_train_step derives for that step: the masks our step makes inside itself."""
    @jax.jit
    def mask(tokens, step):
        mask_key, _ = jax.random.split(jax.random.fold_in(train_key, step))
        return bert.mask_tokens(mask_key, tokens, mask_rate, vocab_size)

    return [jax.device_get(mask(tokens, np.int32(step))) for step, tokens in enumerate(batches)]


def run_ours(cfg, args, batches: np.ndarray, lrs: list[float], init_key, train_key) -> tuple[dict, dict]:
    """(initial params as numpy, curves {loss, grad_norm}): train.py's optimiser and jitted step, fp32."""
    bert.set_precision("fp32")
    net, mesh = bert.mlm_model(cfg), Mesh(np.array(jax.devices()), ("data",))
    tx = bert.make_optimizer(weight_decay=args.weight_decay, b1=args.b1, b2=args.b2, eps=args.eps,
                             clip_norm=args.grad_clip)  # as train.main
    state = train.init_state(net, tx, init_key, seq_len=batches.shape[2],
                             num_masked=bert.num_masked(batches.shape[2], args.mask_rate))
    params0 = jax.device_get(state.params)  # copied out: the step donates the state
    state = train.replicate(state, mesh)
    step_fn = train.make_train_step(net, tx, cfg, args.mask_rate, mesh)
    key = train.replicate(np.asarray(train_key), mesh)
    curves = dict(loss=[], grad_norm=[])
    for step, (tokens, lr) in enumerate(zip(batches, lrs)):
        state, metrics = step_fn(state, train.shard_rows(tokens, mesh), np.int32(step), np.float32(lr), key,
                                 accum_steps=1)
        curves["loss"].append(float(metrics["loss"]))
        curves["grad_norm"].append(float(metrics["grad_norm"]))
    return params0, curves


def export(cfg, params: dict, tokenizer_bytes: bytes, folder: str):
    """Our params -> the transformers model that hf.export_hf writes for them (via a train.py checkpoint)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    ckpt = checkpoint.save_checkpoint(os.path.join(folder, "run"), {"step": 0, "config": dataclasses.asdict(cfg)},
                                      checkpoint.flatten(params, "params"), tokenizer_bytes, 1)
    hf.export_hf(ckpt, os.path.join(folder, "hf"))
    return transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(folder, "hf"), attn_implementation="eager")


def run_torch(hf_model, args, masks: list[tuple], lrs: list[float], dtype) -> dict:
    """Curves {loss, grad_norm (clip_grad_norm_'s), grad_norm_f64} of the transformers model trained with
    torch.optim.AdamW on the same masks."""
    import torch
    import torch.nn.functional as F

    hf_model = hf_model.to(dtype).train()  # no dropout: the export carries ours (0.0)
    params = list(hf_model.parameters())  # the tied decoder is the word embedding: one parameter
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},  # bert.decay_mask
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]  # biases, LayerNorm
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(args.b1, args.b2), eps=args.eps)
    curves = dict(loss=[], grad_norm=[], grad_norm_f64=[])
    for (inputs, positions, targets, weights), lr in zip(masks, lrs):
        inputs, positions, targets = (torch.from_numpy(np.asarray(x, np.int64)) for x in (inputs, positions, targets))
        weights = torch.tensor(np.asarray(weights), dtype=dtype)  # [B, M]
        logits = hf_model(input_ids=inputs).logits  # [B, T, V], every position decoded
        picked = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))  # [B, M, V]
        nll = F.cross_entropy(picked.flatten(0, 1), targets.flatten(), reduction="none").view_as(weights)  # [B, M]
        loss = (nll * weights).sum() / weights.sum().clamp(min=1.0)
        opt.zero_grad()
        loss.backward()
        exact = torch.stack([p.grad.double().square().sum() for p in params]).sum().sqrt()  # float64 reference
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))  # the norm before clipping
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        curves["loss"].append(loss.item())
        curves["grad_norm"].append(norm.item())
        curves["grad_norm_f64"].append(exact.item())
    return curves


def rel_diff(a: list[float], b: list[float]) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b) / np.abs(b)


def verdict(ours: dict, theirs: dict) -> dict:
    """The three numbers the goals are about, and whether each is met."""
    loss = rel_diff(ours["loss"], theirs["loss"])
    got = dict(first10=float(loss[:10].max()), all=float(loss.max()),
               grad_norm=float(rel_diff(ours["grad_norm"][:1], theirs["grad_norm"][:1])[0]))
    return dict(got, passed={k: got[k] <= GOALS[k] for k in GOALS})


def compare(cfg, args, tokenizer_bytes: bytes, batches: np.ndarray, lrs: list[float], dtypes=("float32",)) -> dict:
    """Train ours and the exported transformers copy (once per torch dtype) on batches [N, B, T]; the curves."""
    import torch

    root = jax.random.PRNGKey(args.seed)
    init_key, train_key = jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)  # as train.main
    params0, ours = run_ours(cfg, args, batches, lrs, init_key, train_key)
    masks = masks_for(train_key, batches, args.mask_rate, cfg.vocab_size)
    curves = {"ours": ours}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            curves[f"torch_{dtype}"] = run_torch(export(cfg, params0, tokenizer_bytes, os.path.join(tmp, dtype)),
                                                 args, masks, lrs, getattr(torch, dtype))
    return curves


def main(argv=None) -> None:
    args = parse_args(argv)
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"bench_parity.py needs {' and '.join(missing)} (not requirements of this codebase): "
                        f"pip install torch transformers")
    import torch

    lrs = lr_schedule(args)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_bytes, vocab_size, batches = make_batches(args, tmp)
    cfg = bert.make_config(args.model, vocab_size, post_ln=args.post_ln)
    theirs_name = hf.LAYOUTS["bert" if cfg.post_ln else "roberta-prelayernorm"][1]
    print(f"{args.model} {'post-LN' if cfg.post_ln else 'pre-LN'} {cfg}\nours (train.py step) vs {theirs_name} + "
          f"torch.optim.AdamW; {args.steps} steps x {args.batch_size} x {args.seq_len} tokens; fp32; "
          f"torch {torch.get_num_threads()} threads", flush=True)
    start = time.perf_counter()
    curves = compare(cfg, args, tokenizer_bytes, batches, lrs,
                     ("float32", "float64") if args.f64_reference else ("float32",))
    seconds = time.perf_counter() - start
    ours, theirs = curves["ours"], curves["torch_float32"]
    diff = rel_diff(ours["loss"], theirs["loss"])
    print(f"{'step':>5} {'lr':>9} {'ours':>10} {'torch':>10} {'rel diff':>9}")
    for i in range(args.steps):
        if i < 10 or (i + 1) % 10 == 0:
            print(f"{i + 1:>5} {lrs[i]:>9.2e} {ours['loss'][i]:>10.6f} {theirs['loss'][i]:>10.6f} {diff[i]:>9.1e}")
    result = verdict(ours, theirs)
    print(f"grad norm at step 1: ours {ours['grad_norm'][0]:.7f}, torch {theirs['grad_norm'][0]:.7f} "
          f"(rel diff {result['grad_norm']:.1e}); torch's gradients' norm summed in float64: "
          f"{theirs['grad_norm_f64'][0]:.7f} (clip_grad_norm_'s float32 norm is off by "
          f"{rel_diff(theirs['grad_norm'][:1], theirs['grad_norm_f64'][:1])[0]:.1e})")
    print(f"max relative loss difference: first 10 steps {result['first10']:.2e}, all {args.steps} steps "
          f"{result['all']:.2e}")
    if args.f64_reference:
        f64 = curves["torch_float64"]["loss"]
        drift = {name: rel_diff(curves[name]["loss"], f64) for name in ("ours", "torch_float32")}
        result["vs_float64"] = {name: dict(first10=float(d[:10].max()), all=float(d.max())) for name, d in
                                drift.items()}
        for name, d in drift.items():
            print(f"max relative loss difference from torch float64, {name}: first 10 {d[:10].max():.2e}, "
                  f"all {d.max():.2e}")
    for key, label in (("first10", "loss, first 10 steps"), ("all", f"loss, all {args.steps} steps"),
                       ("grad_norm", "grad norm at step 1")):
        print(f"{'PASS' if result['passed'][key] else 'FAIL'} {label}: {result[key]:.2e} <= {GOALS[key]:g}")
    print(f"{seconds:.1f} s for both runs (compilation and export included)")
    if args.out:
        common.atomic_write_json(args.out, dict(args=vars(args), config=dataclasses.asdict(cfg), lr=lrs,
                                                curves=curves, goals=GOALS, result=result, seconds=seconds))
    if not all(result["passed"].values()):
        sys.exit(1)


if __name__ == "__main__":
    common.run_main(main)
