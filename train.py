"""Pretrain BERT by masked-language modelling on the token files data.py writes.

    python train.py --batch_size 256 --max_tokens 1B                     # mini BERT, data/ and tokenizer.json
    python train.py --model base --batch_size 2048 --micro_batch_size 64 --batch_size_start 256
    python train.py --out_dir out --resume                                # continue exactly where out/ stopped

Training length, schedules, evaluation and checkpoint intervals are counted in tokens (sequences x seq_len), so
they mean the same whatever the batch size. Each step: one global batch, split into microbatches (gradient
accumulation inside one jitted step), data-parallel over every device of every process (params replicated).
Outputs in --out_dir: ckpt_<step>/ (arrays.npz, state.json, tokenizer.json; the last --keep_ckpts kept) and tb/
(tensorboardX scalars, x axis = tokens seen).

Multi-host: start one process per host with --coordinator HOST:PORT --num_processes N --process_id I (or
--coordinator auto on TPU pods / SLURM); every host reads the same global batch and keeps its own rows. Process 0
writes checkpoints and logs; checkpoints must be on a filesystem every host can read to resume.
"""
import argparse
import dataclasses
import math
import os
import signal
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

import checkpoint
import common
import data
import hf
import model as bert
from common import UserError

# Masking randomness must not depend on how the batch is split over devices (1 device == N devices).
jax.config.update("jax_threefry_partitionable", True)

# Flags that change how a run is executed or reported, never its numbers; a resumed run may change them freely.
OPERATIONAL_FLAGS = {"data_dir", "tokenizer", "out_dir", "resume", "log_every", "eval_every", "ckpt_every",
                     "keep_ckpts", "peak_flops", "micro_batch_size", "decode_all", "coordinator", "num_processes",
                     "process_id"}
PER_PROCESS_FLAGS = {"out_dir", "resume", "coordinator", "num_processes", "process_id"}


# ----------------------------------------------------------------------------------------------------------------
# Flags

def parse_count(text: str) -> int:
    """'1B', '2.5M', '500k', '1e6', '1_000_000' -> int (token counts)."""
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(s[-1:].lower(), 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (examples: 500k, 10M, 1.5B, 1e9)") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"not a non-negative count: {text!r}")
    return int(round(value))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="data", help="folder written by data.py (default: data)")
    g.add_argument("--tokenizer", default="tokenizer.json",
                   help="tokenizer.json the data was made with; checked against the data's meta.json and, on "
                        "--resume, the checkpoint's copy (default: tokenizer.json)")
    g.add_argument("--out_dir", default="out", help="checkpoints and tensorboard logs go here (default: out)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir from its latest complete checkpoint, with the flags saved "
                        "there (flags given now override them; changing one that affects the numbers is reported)")
    g.add_argument("--seed", type=int, default=0, help="seeds init, data order and masking (default: 0)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mini", choices=list(bert.PRESETS),
                   help="size preset: tiny L2/H128, mini L4/H256, small L4/H512, medium L8/H512, base L12/H768, "
                        "large L24/H1024; heads H/64, MLP 4H (default: mini)")
    g.add_argument("--num_layers", type=int, help="override the preset's number of layers")
    g.add_argument("--hidden_size", type=int, help="override the preset's hidden size")
    g.add_argument("--num_heads", type=int, help="override the number of attention heads (default: hidden/64)")
    g.add_argument("--intermediate_size", type=int, help="override the MLP width (default: 4*hidden)")
    g.add_argument("--post_ln", action=argparse.BooleanOptionalAction, default=None,
                   help="BERT's original post-LayerNorm layout instead of pre-LN (default: pre-LN)")
    g.add_argument("--init_hf", metavar="DIR",
                   help="continue pretraining a Hugging Face BERT folder (see hf.py): its weights and model shape "
                        "(--model and the shape flags do not apply) and its converted tokenizer (--tokenizer does "
                        "not apply); --data_dir must be made with that tokenizer: python hf.py --tokenizer DIR "
                        "tok.json, then python data.py --tokenizer tok.json")
    g.add_argument("--position_init", choices=["normal", "sinusoidal"], default="normal",
                   help="initial position embeddings: BERT's truncated normal (std 0.02), or a sine/cosine table "
                        "with the same std, which makes attention by relative offset easy to learn from the "
                        "start; the embeddings are learned either way (default: normal)")
    g.add_argument("--dropout", type=float, default=0.0, help="hidden and attention dropout (default: 0.0)")
    g.add_argument("--seq_len", type=int, default=128, help="tokens per training window (default: 128)")
    g.add_argument("--seq_len_start", type=int,
                   help="sequence-length warmup: train on windows of this length first, doubling up to --seq_len "
                        "in equal stages over --seq_warmup_frac of --max_tokens, with the same tokens per step "
                        "(more, shorter windows); --seq_len / --seq_len_start must be a power of 2 (default: "
                        "--seq_len, no warmup)")
    g.add_argument("--seq_warmup_frac", type=float, default=0.5,
                   help="the sequence-length warmup spans this fraction of --max_tokens (default: 0.5)")
    g.add_argument("--mask_rate", type=float, default=0.15,
                   help="fraction of each window's positions predicted, round(mask_rate*seq_len) per row "
                        "(default: 0.15)")
    g.add_argument("--decode_all", action=argparse.BooleanOptionalAction, default=False,
                   help="run the MLM decoder at all seq_len positions of each window, the original BERT (and "
                        "transformers) way, instead of only at the masked ones: the same loss (still over the "
                        "masked positions only), more compute; for ablations. Training steps only: evaluation "
                        "decodes the masked positions, whose numbers are the same")
    g.add_argument("--precision", choices=list(bert.PRECISIONS),
                   help="compute dtype; params stay fp32; fp16 adds dynamic loss scaling "
                        "(default: bf16 on GPU/TPU, fp32 on CPU; on --resume the checkpoint's)")
    g.add_argument("--loss_scale_init", type=float, default=2.0**15,
                   help="fp16 only: initial dynamic loss scale; a resumed fp16 run keeps its saved scale "
                        "(default: 32768)")

    g = p.add_argument_group("optimiser (AdamW; no weight decay on biases and LayerNorm)")
    g.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    g.add_argument("--warmup_frac", type=float, default=0.06,
                   help="linear warmup from 0 to --lr over this fraction of --max_tokens (default: 0.06)")
    g.add_argument("--final_lr_frac", type=float, default=0.0,
                   help="the learning rate anneals to --lr times this at --max_tokens (default: 0.0)")
    g.add_argument("--anneal", choices=["cos", "linear"], default="cos",
                   help="shape of the decay after warmup (default: cos)")
    g.add_argument("--weight_decay", type=float, default=0.01, help="decoupled weight decay (default: 0.01)")
    g.add_argument("--b1", type=float, default=0.9, help="Adam beta1 (default: 0.9)")
    g.add_argument("--b2", type=float, default=0.98, help="Adam beta2 (default: 0.98)")
    g.add_argument("--eps", type=float, default=1e-6, help="Adam epsilon (default: 1e-6)")
    g.add_argument("--grad_clip", type=float, default=1.0,
                   help="clip gradients to this global norm; 0 = no clipping (default: 1.0)")

    g = p.add_argument_group("batch and length")
    g.add_argument("--max_tokens", type=parse_count, default=parse_count("2M"),
                   help="train on this many tokens (sequences x seq_len); suffixes k/M/B (default: 2M, the "
                        "quick start: about 10 minutes of mini on a 2-core CPU)")
    g.add_argument("--batch_size", type=int, default=64, help="global batch size in sequences (default: 64)")
    g.add_argument("--batch_size_start", type=int,
                   help="ramp the batch size linearly from this to --batch_size; 0 = no ramp (default: 32, or "
                        "--batch_size if smaller)")
    g.add_argument("--batch_warmup_frac", type=float, default=0.1,
                   help="the batch-size ramp spans this fraction of --max_tokens (default: 0.1)")
    g.add_argument("--micro_batch_size", type=int,
                   help="sequences per device per forward/backward pass; each step accumulates gradients over "
                        "batch / (micro_batch_size x devices) microbatches; batch sizes are rounded to multiples "
                        "of micro_batch_size x devices (default: the starting batch over the devices)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval_every", type=parse_count, default=parse_count("1M"),
                   help="evaluate every this many tokens, and at the end; 0 = only at the end (default: 1M)")
    g.add_argument("--eval_windows", type=int, default=512,
                   help="evaluate MLM loss and accuracy on this many fixed windows of val.bin, with fixed masks; "
                        "0 = no evaluation (default: 512)")
    g.add_argument("--log_every", type=int, default=50, help="print a line every this many steps (default: 50)")
    g.add_argument("--ckpt_every", type=parse_count, default=parse_count("1M"),
                   help="checkpoint every this many tokens, and at the end; 0 = only at the end (default: 1M)")
    g.add_argument("--keep_ckpts", type=int, default=3, help="keep the last this many checkpoints (default: 3)")
    g.add_argument("--peak_flops", type=float, default=0.0,
                   help="peak FLOP/s of one device, for MFU; 0 = measure a dense matmul in the compute dtype at "
                        "startup (MFU is then relative to achievable, not datasheet, throughput) (default: 0)")

    g = p.add_argument_group("multi-host (one process per host)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0 for jax.distributed.initialize, or 'auto' to "
                                         "detect the cluster (TPU pod, SLURM, ...) (default: single process)")
    g.add_argument("--num_processes", type=int, help="number of processes (with --coordinator HOST:PORT)")
    g.add_argument("--process_id", type=int, help="this process's index (with --coordinator HOST:PORT)")
    return p


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict | None]:
    """Flags, and with --resume the latest checkpoint's state (its saved flags fill in the ones not given)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        return args, None
    path = checkpoint.latest_checkpoint(args.out_dir)
    if path is None:
        raise UserError(f"--resume: no complete checkpoint in {args.out_dir}")
    saved = checkpoint.read_state(path)
    seeded = {k: v for k, v in saved["args"].items() if k not in PER_PROCESS_FLAGS}
    args = parser.parse_args(argv, namespace=argparse.Namespace(**seeded))  # given flags override saved ones
    saved["changed"] = [f"--{k} {getattr(args, k)} (was {v})" for k, v in sorted(saved["args"].items())
                        if k not in OPERATIONAL_FLAGS and getattr(args, k, v) != v]
    saved["path"] = path
    return args, saved


# ----------------------------------------------------------------------------------------------------------------
# Schedules (pure functions of tokens seen)

def lr_at(tokens: float, *, peak: float, max_tokens: int, warmup_frac: float, final_frac: float,
          anneal: str = "cos") -> float:
    """One cycle: linear warmup from 0 to peak over warmup_frac*max_tokens, then anneal to peak*final_frac."""
    warmup = warmup_frac * max_tokens
    if tokens < warmup:
        return peak * tokens / warmup
    final = peak * final_frac
    progress = min(1.0, (tokens - warmup) / max(max_tokens - warmup, 1))
    if anneal == "cos":
        return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak + (final - peak) * progress


def ramp_start(args: argparse.Namespace) -> int:
    """The batch size the ramp starts from (--batch_size_start; 0 = no ramp)."""
    if args.batch_size_start is None:
        return min(32, args.batch_size)
    return args.batch_size_start or args.batch_size


def batch_size_at(tokens: float, *, start: int, end: int, ramp_tokens: float, multiple: int) -> int:
    """Linear ramp from start to end sequences over ramp_tokens, rounded to the nearest multiple of `multiple`."""
    if ramp_tokens <= 0 or tokens >= ramp_tokens:
        return end
    exact = start + (end - start) * tokens / ramp_tokens
    rounded = multiple * math.floor(exact / multiple + 0.5)
    return int(min(max(rounded, min(start, end)), max(start, end)))


def seq_len_at(tokens: float, *, start: int, end: int, warmup_tokens: float) -> int:
    """Window length: start, 2*start, ... in equal token stages over warmup_tokens, then end."""
    if start >= end or tokens >= warmup_tokens:
        return end
    stages = round(math.log2(end // start))  # the lengths below end
    return start * 2 ** int(tokens * stages / warmup_tokens)


def crossed(before: int, after: int, every: int) -> bool:
    """Did the token count pass a multiple of `every` during this step?"""
    return every > 0 and before // every != after // every


# ----------------------------------------------------------------------------------------------------------------
# Optimiser and training step

def decay_mask(params) -> dict:
    """Weight decay on matrices (weights, embeddings) only: not on biases or LayerNorm scales/offsets."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "layer_norm" not in checkpoint.path_key(path), params)


def global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_optimizer(args) -> optax.GradientTransformation:
    """AdamW with a unit learning rate: the step multiplies the updates by the scheduled lr (a traced scalar)."""
    clip = [optax.clip_by_global_norm(args.grad_clip)] if args.grad_clip > 0 else []
    return optax.chain(*clip, optax.adamw(1.0, b1=args.b1, b2=args.b2, eps=args.eps,
                                          weight_decay=args.weight_decay, mask=decay_mask))


def init_state(net, tx, key, *, seq_len: int, num_masked: int, position_init: str = "normal") -> dict:
    """Fresh params and optimiser state (the loss scale is added by the caller)."""
    params = net.init(key, jnp.zeros((1, seq_len), jnp.int32), jnp.zeros((1, num_masked), jnp.int32))
    if position_init == "sinusoidal":
        table = params["bert/embeddings/position"]["embeddings"]  # [P, H]
        params["bert/embeddings/position"]["embeddings"] = bert.sinusoidal_positions(*table.shape)
    return dict(params=params, opt_state=tx.init(params))


def make_train_step(net, tx, cfg: bert.BertConfig, mask_rate: float, mesh: Mesh, traces: list | None = None,
                    decode_all: bool = False):
    """A jitted step(state, tokens [B, T], step, lr, train_key, accum_steps=A) -> (state, metrics).

    tokens are sharded by rows over the mesh's "data" axis. Rows j*A + a (j = 0..B/A-1) form microbatch a, so
    each device's rows split into A local microbatches without moving data. Gradients are summed over a device's
    microbatches in a lax.scan, then all-reduced once. The state (params, opt_state, loss_scale) is donated.
    decode_all: decode all T positions (M = T below), with zero loss weight where nothing was masked.
    """
    def local_grads(params, loss_scale, inputs, positions, targets, weights, total_weight, dropout_key, accum_steps):
        def microbatches(x):  # [b, ...] -> [A, b/A, ...]
            return x.reshape(-1, accum_steps, *x.shape[1:]).swapaxes(0, 1)

        def loss_fn(p, inputs, positions, targets, weights, rng):
            logits = net.apply(p, rng, inputs, positions, is_training=True)  # [b/A, M, V]
            loss, acc = bert.mlm_loss(logits, targets, weights)
            share = weights.sum() / total_weight  # this microbatch's part of the whole batch's weighted mean
            return loss_scale.scale(loss * share), (loss * share, acc * share)

        def accumulate(carry, xs):
            index, micro = xs[0], xs[1:]
            rng = jax.random.fold_in(dropout_key, index)
            grads, (loss, acc) = jax.grad(loss_fn, has_aux=True)(params, *micro, rng)
            grad_sum, loss_sum, acc_sum = carry
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, acc_sum + acc), None

        dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index("data"))
        zero = jnp.zeros((), jnp.float32)
        init = (jax.tree.map(jnp.zeros_like, params), zero, zero)
        xs = (jnp.arange(accum_steps), *map(microbatches, (inputs, positions, targets, weights)))
        (grads, loss, acc), _ = jax.lax.scan(accumulate, init, xs)
        return jax.lax.psum((grads, loss, acc), "data")

    def train_step(state, tokens, step, lr, train_key, accum_steps: int):
        if traces is not None:
            traces.append(accum_steps)  # runs once per compilation, not per step
        mask_key, dropout_key = jax.random.split(jax.random.fold_in(train_key, step))
        inputs, positions, targets, weights = bert.mask_tokens(mask_key, tokens, mask_rate, cfg.vocab_size)
        if decode_all:
            positions, targets, weights = bert.all_positions(tokens, positions, weights)  # [B, T] each
        total_weight = jnp.maximum(weights.sum(), 1.0)
        rows, same = P("data"), P()
        grads, loss, acc = jax.shard_map(
            partial(local_grads, accum_steps=accum_steps), mesh=mesh, check_vma=False,
            in_specs=(same, same, rows, rows, rows, rows, same, same), out_specs=same,
        )(state["params"], state["loss_scale"], inputs, positions, targets, weights, total_weight, dropout_key)

        loss_scale = state["loss_scale"]
        grads = loss_scale.unscale(grads)
        finite = jmp.all_finite(grads) & jnp.isfinite(loss)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], jax.tree.map(lambda u: lr * u, updates))
        # A step with non-finite gradients changes nothing but the loss scale (fp16) and is reported.
        params, opt_state = jmp.select_tree(finite, (params, opt_state), (state["params"], state["opt_state"]))
        new_state = dict(params=params, opt_state=opt_state, loss_scale=loss_scale.adjust(finite))
        metrics = dict(loss=loss, accuracy=acc, grad_norm=global_norm(grads), finite=finite,
                       loss_scale=jnp.asarray(new_state["loss_scale"].loss_scale, jnp.float32))
        return new_state, metrics

    replicated = NamedSharding(mesh, P())
    return jax.jit(train_step, static_argnames="accum_steps", donate_argnums=0,
                   out_shardings=(replicated, replicated))


def make_eval_step(net, cfg: bert.BertConfig, mask_rate: float, eval_key, mesh: Mesh):
    """Jitted (params, windows [b, T], row ids [b]) -> (loss sum, correct sum, weight sum).

    Row i of the eval set is masked with fold_in(eval_key, i): the same masks at every evaluation, whatever the
    chunking or the number of devices. All-[PAD] padding rows have no maskable position, so weight 0.
    """
    def mask_row(row, window):  # [T] -> one row of mask_tokens' outputs
        masked = bert.mask_tokens(jax.random.fold_in(eval_key, row), window[None], mask_rate, cfg.vocab_size)
        return [x[0] for x in masked]

    def eval_step(params, windows, rows):
        inputs, positions, targets, weights = jax.vmap(mask_row)(rows, windows)
        logits = net.apply(params, None, inputs, positions, is_training=False)  # [b, M, V]
        loss, acc = bert.mlm_loss(logits, targets, weights)
        total = weights.sum()
        return loss * total, acc * total, total

    return jax.jit(eval_step, out_shardings=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------------------------------------------
# Devices

def setup_distributed(args) -> None:
    if args.coordinator == "auto":
        jax.distributed.initialize()
    elif args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise UserError("--coordinator HOST:PORT needs --num_processes and --process_id")
        if not 0 <= args.process_id < args.num_processes:
            raise UserError(f"need 0 <= --process_id < --num_processes, got --process_id {args.process_id} and "
                            f"--num_processes {args.num_processes}")
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.num_processes not in (None, 1) or args.process_id not in (None, 0):
        raise UserError("--num_processes/--process_id need --coordinator")


def replicate(tree, mesh: Mesh):
    """Host arrays (the same on every process) -> arrays replicated on every device of the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree)


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global host array [B, ...] (the same on every process) -> rows sharded over "data"; each process
    contributes its own contiguous block of rows."""
    n, i = jax.process_count(), jax.process_index()
    rows = x.shape[0] // n
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), x[i * rows:(i + 1) * rows],
                                                  x.shape)


def measure_peak_flops(dtype, n: int) -> float:
    """FLOP/s of an n x n matmul on one device: the MFU denominator when --peak_flops is not given."""
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    reps = 10
    start = time.perf_counter()
    for _ in range(reps):
        out = matmul(a, a)
    out.block_until_ready()
    return 2 * n**3 * reps / (time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------------
# Main

def check_config(args, num_devices: int) -> None:
    """Impossible or meaningless flag combinations, found before any work is done."""
    for name in ("seq_len", "batch_size", "log_every", "keep_ckpts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_frac", "final_lr_frac", "batch_warmup_frac"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.lr <= 0 or args.eval_windows < 0 or args.grad_clip < 0 or args.weight_decay < 0:
        raise UserError("--lr must be > 0 and --eval_windows, --grad_clip, --weight_decay >= 0")
    if args.micro_batch_size is not None and args.micro_batch_size < 1:
        raise UserError(f"--micro_batch_size must be >= 1, got {args.micro_batch_size}")
    if args.batch_size_start is not None and args.batch_size_start < 0:
        raise UserError(f"--batch_size_start must be >= 0 (0 = no ramp), got {args.batch_size_start}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UserError(f"--out_dir {args.out_dir} is a file, not a folder")
    start = ramp_start(args)
    for flag, size in (("--batch_size", args.batch_size), ("--batch_size_start", start)):
        if size % num_devices:
            raise UserError(f"{flag} {size} does not divide among {num_devices} devices")
    micro = args.micro_batch_size or start // num_devices
    for flag, size in (("--batch_size", args.batch_size), ("--batch_size_start", start)):
        if micro < 1 or size % (micro * num_devices):
            raise UserError(f"{flag} {size} is not a multiple of --micro_batch_size {micro} x {num_devices} devices")
    short = args.seq_len_start or args.seq_len
    ratio = args.seq_len // short if short > 0 else 0
    if short < 1 or args.seq_len % short or ratio & (ratio - 1):
        raise UserError(f"--seq_len {args.seq_len} must be --seq_len_start {args.seq_len_start} times a power of 2")
    if not 0.0 <= args.seq_warmup_frac <= 1.0:
        raise UserError(f"--seq_warmup_frac must be in [0, 1], got {args.seq_warmup_frac}")
    if args.max_tokens < start * args.seq_len:
        raise UserError(f"--max_tokens {args.max_tokens} is less than one batch ({start} x {args.seq_len} tokens)")


def main(argv: list[str] | None = None) -> dict:
    """Train; returns the history of this run (per-step losses, evals, ...), for tests and notebooks."""
    args, resumed = parse_args(argv)
    setup_distributed(args)
    num_devices, is_main = jax.device_count(), jax.process_index() == 0
    check_config(args, num_devices)
    micro = args.micro_batch_size or ramp_start(args) // num_devices
    rows_per_micro = micro * num_devices  # global rows in one microbatch; batch sizes are multiples of it

    # Data and tokenizer: the data must have been made with this tokenizer (and the checkpoint's).
    if args.init_hf:  # the data must have been made with the checkpoint's tokenizer, converted by hf.py
        hf_cfg, _ = hf.read_config(args.init_hf)
        tokenizer_bytes, _ = hf.convert_tokenizer(args.init_hf, hf_cfg.vocab_size)
        tokenizer_sha, vocab_size = common.sha256_bytes(tokenizer_bytes), hf_cfg.vocab_size
        if data.load_meta(args.data_dir)["tokenizer_sha256"] != tokenizer_sha:
            raise UserError(f"{args.data_dir} was not made with the tokenizer of {args.init_hf}: convert it with "
                            f"python hf.py --tokenizer {args.init_hf} tok.json, then make the data with python "
                            f"data.py --tokenizer tok.json --out {args.data_dir}")
    else:
        vocab_size = common.load_tokenizer(args.tokenizer).get_vocab_size()
        with open(args.tokenizer, "rb") as f:
            tokenizer_bytes = f.read()
        tokenizer_sha = common.sha256_bytes(tokenizer_bytes)
    if resumed and resumed["tokenizer_sha256"] != tokenizer_sha:
        raise UserError(f"{args.init_hf or args.tokenizer} is not the tokenizer of checkpoint {resumed['path']} "
                        f"(sha256 {tokenizer_sha} vs {resumed['tokenizer_sha256']})")
    reader = data.TokenReader(args.data_dir, "train", args.seq_len, args.seed, tokenizer_sha, vocab_size)
    overrides = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size",
                                               "post_ln") if getattr(args, k) is not None}
    if args.init_hf and overrides:
        raise UserError(f"--init_hf takes the model shape from {args.init_hf}; drop "
                        + ", ".join(f"--{k}" for k in overrides))
    if args.init_hf:
        cfg = dataclasses.replace(hf_cfg, dropout=args.dropout)
    else:
        cfg = bert.make_config(args.model, reader.vocab_size, dropout=args.dropout, **overrides)
    if args.seq_len > cfg.max_position:
        raise UserError(f"--seq_len {args.seq_len} exceeds the model's max_position {cfg.max_position}")
    num_masked = bert.num_masked(args.seq_len, args.mask_rate)
    if not resumed and checkpoint.latest_checkpoint(args.out_dir):
        raise UserError(f"{args.out_dir} holds checkpoints of another run: pass --resume to continue it, "
                        "or choose another --out_dir")
    if resumed:
        differ = [f"{k} {v} (checkpoint {resumed['config'].get(k)})" for k, v in dataclasses.asdict(cfg).items()
                  if k != "dropout" and v != resumed["config"].get(k)]
        if differ:
            raise UserError(f"the model differs from checkpoint {resumed['path']}'s: {', '.join(differ)}")
        if resumed["changed"] and is_main:
            print(f"warning: resuming with changed settings, so the run differs from the original: "
                  f"{', '.join(resumed['changed'])}", file=sys.stderr)

    # Model, optimiser, state (params, opt_state and loss scale replicated on every device).
    default_precision = "fp32" if jax.default_backend() == "cpu" else "bf16"
    precision = args.precision or (resumed["precision"] if resumed else default_precision)
    policy = bert.set_precision(precision)
    net = bert.mlm_model(cfg)
    tx = make_optimizer(args)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    root_key = jax.random.PRNGKey(args.seed)
    init_key, train_key, eval_key = (jax.random.fold_in(root_key, i) for i in range(3))

    init = partial(init_state, net, tx, seq_len=args.seq_len, num_masked=num_masked,
                   position_init=args.position_init)
    if resumed:
        arrays = checkpoint.read_arrays(resumed["path"])
        template = jax.eval_shape(init, init_key)
        state = replicate({k: checkpoint.unflatten_like(template[k], arrays, k) for k in template}, mesh)
        step, tokens_seen, skipped = resumed["step"], resumed["tokens_seen"], resumed["skipped_steps"]
    else:
        state = jax.jit(init, out_shardings=replicated)(init_key)
        if args.init_hf:  # its weights; the heads it lacks keep their fresh init
            params, _ = checkpoint.merge_params(jax.device_get(state["params"]), hf.load_hf(args.init_hf)[1],
                                                args.init_hf)
            state = replicate(dict(params=params, opt_state=tx.init(params)), mesh)
        step, tokens_seen, skipped = 0, 0, 0
    state["loss_scale"] = jmp.NoOpLossScale()
    if precision == "fp16":  # the saved scale, unless the run starts (or resumes from fp32/bf16) here
        scale = (resumed and resumed["loss_scale"]) or {"value": args.loss_scale_init, "counter": 0}
        state["loss_scale"] = replicate(jmp.DynamicLossScale(np.float32(scale["value"]), np.int32(scale["counter"])),
                                        mesh)
    traces: list[int] = []
    train_step = make_train_step(net, tx, cfg, args.mask_rate, mesh, traces, args.decode_all)
    train_key = replicate(np.asarray(train_key), mesh)

    if args.eval_windows:  # fixed windows, padded with [PAD] rows to whole microbatches
        val = data.TokenReader(args.data_dir, "val", args.seq_len, args.seed, tokenizer_sha)
        padded = -(-args.eval_windows // rows_per_micro) * rows_per_micro
        eval_windows = np.zeros((padded, args.seq_len), np.int32)  # [N', T]
        eval_windows[:args.eval_windows] = val.batch(0, args.eval_windows)
        eval_rows = np.arange(padded, dtype=np.int32)
        eval_step = make_eval_step(net, cfg, args.mask_rate, eval_key, mesh)

    def evaluate() -> dict:
        sums = np.zeros(3)
        for i in range(0, len(eval_windows), rows_per_micro):
            chunk = (shard_rows(x[i:i + rows_per_micro], mesh) for x in (eval_windows, eval_rows))
            sums += [float(v) for v in eval_step(state["params"], *chunk)]
        loss_sum, correct, total = sums
        return dict(loss=loss_sum / total, accuracy=correct / total)

    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    def flops_at(length: int) -> float:
        return bert.flops_per_token(cfg, length, args.mask_rate, 1.0 if args.decode_all else None)

    flops_per_token = flops_at(args.seq_len)
    peak = args.peak_flops or measure_peak_flops(policy.compute_dtype, 512 if jax.default_backend() == "cpu" else 8192)
    start_from = f"resuming from {resumed['path']}" if resumed else f"from {args.init_hf or 'scratch'}"
    if is_main:
        print(f"model {args.init_hf or args.model} {cfg}: {n_params / 1e6:.2f}M params, "
              f"{flops_per_token / 1e6:.1f} MFLOP/token{' (decoding all positions)' if args.decode_all else ''}; "
              f"{precision}; {num_devices} devices x {micro} sequences per microbatch; "
              f"peak {peak / 1e12:.2f} TFLOP/s/device{' (measured matmul)' if not args.peak_flops else ''}; "
              f"{start_from} at step {step}", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    writer = None
    if is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(os.path.join(args.out_dir, "tb"))

    def save_now() -> str | None:
        arrays = {**checkpoint.flatten(state["params"], "params"),
                  **checkpoint.flatten(state["opt_state"], "opt_state")}
        ls = state["loss_scale"]
        scale_now = ({"value": float(ls.loss_scale), "counter": int(ls.counter)} if precision == "fp16" else None)
        info = checkpoint.run_state(step=step, tokens_seen=tokens_seen, skipped_steps=skipped, cfg=cfg,
                                    precision=precision, loss_scale=scale_now, seed=args.seed,
                                    tokenizer_sha256=tokenizer_sha, args=vars(args), num_devices=num_devices)
        if not is_main:
            return None
        return checkpoint.save_checkpoint(args.out_dir, info, arrays, tokenizer_bytes, args.keep_ckpts)

    stop_signal: list[int] = []
    saved_step: list[int] = []

    def on_signal(signum, frame):
        if stop_signal:  # a second Ctrl-C: stop now, without a checkpoint
            raise KeyboardInterrupt
        stop_signal.append(signum)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    history: dict = dict(loss=[], accuracy=[], lr=[], batch_size=[], grad_norm=[], loss_scale=[], eval=[],
                         traces=traces, num_devices=num_devices, start_step=step, checkpoints=[])
    window: dict = dict(losses=[], accs=[], start=None, tokens=tokens_seen)
    pending: list = []  # the last dispatched step, read back after the next one is dispatched (keeps devices busy)
    bar = tqdm(total=args.max_tokens, initial=min(tokens_seen, args.max_tokens), unit="tok", unit_scale=True,
               disable=None if is_main else True, dynamic_ncols=True)

    def report() -> None:
        """Read back the pending step's metrics: log them, and stop on a non-finite loss unless fp16."""
        nonlocal skipped
        if not pending:
            return
        at_step, at_tokens, batch, length, lr, metrics = pending.pop()
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m["finite"]:
            if precision != "fp16":
                last = checkpoint.latest_checkpoint(args.out_dir)
                raise SystemExit(f"error: loss or gradients not finite at step {at_step} (loss {m['loss']}); "
                                 f"stopped, last good checkpoint: {last}. Try a lower --lr, longer warmup, "
                                 f"or --precision fp32")
            skipped += 1
        for k, v in (("loss", m["loss"]), ("accuracy", m["accuracy"]), ("lr", lr), ("batch_size", batch),
                     ("grad_norm", m["grad_norm"]), ("loss_scale", m["loss_scale"])):
            history[k].append(v)
            if writer:
                writer.add_scalar(f"train/{k}", v, at_tokens)
        if writer:
            writer.add_scalar("train/step", at_step, at_tokens)
            writer.add_scalar("train/skipped_steps", skipped, at_tokens)
        if m["finite"]:
            window["losses"].append(m["loss"])
            window["accs"].append(m["accuracy"])
        now = time.perf_counter()
        if window["start"] is None:  # throughput is timed from the first finished step (after compilation)
            window.update(start=now, tokens=at_tokens)
        if at_step % args.log_every == 0 or at_tokens >= args.max_tokens:
            seconds = now - window["start"]
            tok_s = (at_tokens - window["tokens"]) / seconds if seconds > 0 else 0.0
            mfu = tok_s * flops_at(length) / (peak * num_devices)
            loss = np.mean(window["losses"]) if window["losses"] else float("nan")
            acc = np.mean(window["accs"]) if window["accs"] else float("nan")
            speed = f"{tok_s / 1e3:.1f}k tok/s | mfu {mfu:.1%}" if tok_s > 0 else "first step"
            line = (f"step {at_step} | tokens {at_tokens / 1e6:.2f}M | loss {loss:.4f} | acc {acc:.3f} | "
                    f"lr {lr:.2e} | batch {batch}{'' if length == args.seq_len else f' (x{args.seq_len // length} of {length})'} | gnorm {m['grad_norm']:.3f} | {speed}")
            if precision == "fp16":
                line += f" | scale {m['loss_scale']:g} | skipped {skipped}"
            if is_main:
                tqdm.write(line, file=sys.stdout)
                sys.stdout.flush()
            if writer and tok_s > 0:
                writer.add_scalar("perf/tokens_per_s", tok_s, at_tokens)
                writer.add_scalar("perf/mfu", mfu, at_tokens)
            window.update(losses=[], accs=[], start=now, tokens=at_tokens)

    def run_eval() -> None:
        report()
        started = time.perf_counter()
        result = evaluate()
        history["eval"].append(dict(step=step, tokens=tokens_seen, **result))
        if writer:
            writer.add_scalar("eval/loss", result["loss"], tokens_seen)
            writer.add_scalar("eval/accuracy", result["accuracy"], tokens_seen)
        if is_main:
            tqdm.write(f"eval step {step} | tokens {tokens_seen / 1e6:.2f}M | loss {result['loss']:.4f} | "
                       f"acc {result['accuracy']:.3f}", file=sys.stdout)
            sys.stdout.flush()
        pause(started)

    def save() -> None:
        if saved_step and saved_step[-1] == step:
            return
        report()  # never save a state whose step has not been checked
        started = time.perf_counter()
        history["checkpoints"].append(save_now())
        saved_step.append(step)
        pause(started)

    def pause(started: float) -> None:  # evaluation and checkpoint time does not count against throughput
        if window["start"] is not None:
            window["start"] += time.perf_counter() - started

    try:
        while tokens_seen < args.max_tokens and not stop_signal:
            batch = batch_size_at(tokens_seen, start=ramp_start(args), end=args.batch_size,
                                  ramp_tokens=args.batch_warmup_frac * args.max_tokens, multiple=rows_per_micro)
            length = seq_len_at(tokens_seen, start=args.seq_len_start or args.seq_len, end=args.seq_len,
                                warmup_tokens=args.seq_warmup_frac * args.max_tokens)
            before, after = tokens_seen, tokens_seen + batch * args.seq_len
            lr = lr_at(after, peak=args.lr, max_tokens=args.max_tokens, warmup_frac=args.warmup_frac,
                       final_frac=args.final_lr_frac, anneal=args.anneal)
            # The same tokens per step at every length: batch x seq_len/length windows of `length` tokens.
            tokens = shard_rows(reader.batch(step, batch * (args.seq_len // length), length), mesh)  # [B', T']
            state, metrics = train_step(state, tokens, np.int32(step), np.float32(lr), train_key,
                                        accum_steps=batch // rows_per_micro)
            step, tokens_seen = step + 1, after
            report()
            pending.append((step, tokens_seen, batch, length, lr, metrics))
            bar.update(min(after, args.max_tokens) - min(before, args.max_tokens))
            if jax.process_count() > 1:  # every process must stop at the same step
                from jax.experimental import multihost_utils
                if multihost_utils.process_allgather(np.int32(len(stop_signal))).max() and not stop_signal:
                    stop_signal.append(signal.SIGTERM)
            if args.eval_windows and crossed(before, after, args.eval_every):
                run_eval()
            if crossed(before, after, args.ckpt_every):
                save()
        report()
        if stop_signal:
            save()
            name = signal.Signals(stop_signal[0]).name
            if is_main:
                print(f"stopped by {name} at step {step}; checkpoint {history['checkpoints'][-1]}; continue with "
                      f"--resume", file=sys.stderr, flush=True)
            sys.exit(128 + stop_signal[0])
        if args.eval_windows and not (history["eval"] and history["eval"][-1]["step"] == step):
            run_eval()
        save()
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        bar.close()
        if writer:
            writer.close()
    history["skipped_steps"] = skipped
    return history


if __name__ == "__main__":
    common.run_main(main)
