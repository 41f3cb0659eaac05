"""Pretrain BERT by masked-language modelling on the token files data.py writes.

    python train.py --batch_size 256 --max_tokens 1B                     # mini BERT, data/ and tokenizer.json
    python train.py --model base --batch_size 2048 --micro_batch_size 64 --batch_size_start 256
    python train.py --out_dir out --resume                                # continue exactly where out/ stopped
    python train.py --max_minutes 6.5 --eval_every 100M                   # max_tokens fixed from timed steps

Training length, schedules, evaluation and checkpoint intervals are counted in tokens (sequences x seq_len), so
they mean the same whatever the batch size. Each step: one global batch, split into microbatches (gradient
accumulation inside one jitted step), data-parallel over every device of every process (params replicated).
Outputs in --out_dir: ckpt_<step>/ (arrays.npz, state.json, tokenizer.json; the last --keep_ckpts kept; see
checkpoint.py) and tb/ (tensorboardX scalars, x axis = tokens seen; plot_log.py reads them).

Multi-host: start one process per host with --coordinator HOST:PORT --num_processes N --process_id I (or
--coordinator auto on TPU pods / SLURM); every host reads the same global batch and keeps its own rows. Process 0
writes checkpoints and logs; checkpoints must be on a filesystem every host can read to resume.
"""
import argparse
import ctypes
import ctypes.util
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import jmp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

import checkpoint
import common
import data
import hf
import model as bert
import train_flags
from common import UserError
from plot_log import TAGS


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


def shape_at(tokens: float, max_tokens: int, args, multiple: int) -> tuple[int, int]:
    """(global batch in seq_len-token sequences, window length) of the step that starts at `tokens` in a run of
    max_tokens: the batch-size ramp and the sequence-length warmup, both fractions of max_tokens."""
    batch = batch_size_at(tokens, start=train_flags.ramp_start(args), end=args.batch_size,
                          ramp_tokens=args.batch_warmup_frac * max_tokens, multiple=multiple)
    length = seq_len_at(tokens, start=args.seq_len_start or args.seq_len, end=args.seq_len,
                        warmup_tokens=args.seq_warmup_frac * max_tokens)
    return batch, length


def steps_per_shape(max_tokens: int, args, multiple: int) -> dict[tuple[int, int], int]:
    """How many steps a run of max_tokens takes at each (batch, length) of its schedules."""
    counts, tokens = {}, 0
    ramps_end = max(args.batch_warmup_frac, args.seq_warmup_frac if args.seq_len_start else 0.0) * max_tokens
    while tokens < max_tokens:
        batch, length = shape_at(tokens, max_tokens, args, multiple)
        steps = 1 if tokens < ramps_end else math.ceil((max_tokens - tokens) / (batch * args.seq_len))  # one shape
        counts[batch, length] = counts.get((batch, length), 0) + steps
        tokens += steps * batch * args.seq_len
    return counts


def tokens_within(seconds: float, step_seconds: dict, eval_seconds: float, args, multiple: int) -> int:
    """--max_minutes: the largest max_tokens, in whole final batches, whose steps (at the measured seconds per step
    of each shape) and evaluations (every --eval_every tokens and at the end) take at most `seconds`; 0 if none."""
    unit, final = args.batch_size * args.seq_len, step_seconds[args.batch_size, args.seq_len]

    def seconds_for(max_tokens: int) -> float:
        evals = (max_tokens // args.eval_every if args.eval_every else 0) + 1 if args.eval_windows else 0
        per_step = steps_per_shape(max_tokens, args, multiple).items()  # a shape not timed: at the final rate
        return evals * eval_seconds + sum(n * step_seconds.get(shape, final * shape[0] / args.batch_size)
                                          for shape, n in per_step)

    low, high = 0, 1  # whole final batches: low fits, high does not
    while seconds_for(high * unit) <= seconds:
        low, high = high, 2 * high
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if seconds_for(mid * unit) <= seconds else (low, mid)
    return low * unit


# ----------------------------------------------------------------------------------------------------------------
# State and steps

class TrainState(NamedTuple):
    """What a step updates and a checkpoint saves, replicated on every device."""
    params: dict  # haiku params of model.mlm_model
    opt_state: optax.OptState
    loss_scale: jmp.LossScale  # dynamic for fp16, else a no-op


def init_state(net, tx, key, *, seq_len: int, num_masked: int, position_init: str = "normal") -> TrainState:
    """Fresh params and optimiser state, no loss scaling."""
    params = net.init(key, jnp.zeros((1, seq_len), jnp.int32), jnp.zeros((1, num_masked), jnp.int32))
    if position_init == "sinusoidal":
        table = params["bert/embeddings/position"]["embeddings"]  # [P, H]
        params["bert/embeddings/position"]["embeddings"] = bert.sinusoidal_positions(*table.shape)
    return TrainState(params, tx.init(params), jmp.NoOpLossScale())


def make_train_step(net, tx, cfg: bert.BertConfig, mask_rate: float, mesh: Mesh, decode_all: bool = False):
    """A jitted step(state, tokens [B, T], step, lr, train_key, accum_steps=A) -> (state, metrics).

    tokens are sharded by rows over the mesh's "data" axis. Rows j*A + a (j = 0..B/A-1) form microbatch a, so
    each device's rows split into A local microbatches without moving data. Gradients are summed over a device's
    microbatches in a lax.scan, then all-reduced once. The state is donated.
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

    def train_step(state: TrainState, tokens, step, lr, train_key, accum_steps: int):
        mask_key, dropout_key = jax.random.split(jax.random.fold_in(train_key, step))
        inputs, positions, targets, weights = bert.mask_tokens(mask_key, tokens, mask_rate, cfg.vocab_size)
        if decode_all:
            positions, targets, weights = bert.all_positions(tokens, positions, weights)  # [B, T] each
        total_weight = jnp.maximum(weights.sum(), 1.0)
        rows, same = P("data"), P()
        grads, loss, acc = jax.shard_map(
            partial(local_grads, accum_steps=accum_steps), mesh=mesh, check_vma=False,
            in_specs=(same, same, rows, rows, rows, rows, same, same), out_specs=same,
        )(state.params, state.loss_scale, inputs, positions, targets, weights, total_weight, dropout_key)

        grads = state.loss_scale.unscale(grads)
        finite = jmp.all_finite(grads) & jnp.isfinite(loss)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, jax.tree.map(lambda u: lr * u, updates))
        # A step with non-finite gradients changes nothing but the loss scale (fp16) and is reported.
        params, opt_state = jmp.select_tree(finite, (params, opt_state), (state.params, state.opt_state))
        new_state = TrainState(params, opt_state, state.loss_scale.adjust(finite))
        metrics = dict(loss=loss, accuracy=acc, grad_norm=optax.tree_utils.tree_norm(grads), finite=finite,
                       loss_scale=jnp.asarray(new_state.loss_scale.loss_scale, jnp.float32))
        return new_state, metrics

    return jax.jit(train_step, static_argnames="accum_steps", donate_argnums=0, out_shardings=NamedSharding(mesh, P()))


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
        join_processes(args)
    elif args.coordinator:
        if args.num_processes is None or args.process_id is None:
            raise UserError("--coordinator HOST:PORT needs --num_processes and --process_id")
        if not 0 <= args.process_id < args.num_processes:
            raise UserError(f"need 0 <= --process_id < --num_processes, got --process_id {args.process_id} and "
                            f"--num_processes {args.num_processes}")
        join_processes(args, args.coordinator, args.num_processes, args.process_id)
    elif args.num_processes not in (None, 1) or args.process_id not in (None, 0):
        raise UserError("--num_processes/--process_id need --coordinator")


def join_processes(args, *where) -> None:
    """jax.distributed.initialize(*where), stopped in one line after --coordinator_timeout seconds. jax's own
    timeout aborts the whole process with a C++ stack trace instead of raising, so ours comes first."""
    def give_up():
        print(f"error: --coordinator {args.coordinator}: the {args.num_processes or 'detected'} processes did not "
              f"all join within --coordinator_timeout {args.coordinator_timeout} s; is the coordinator reachable "
              f"from here, and is every process started?", file=sys.stderr, flush=True)
        os._exit(2)  # initialize() blocks in C++ and cannot be interrupted; nothing is written yet

    timer = threading.Timer(args.coordinator_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        jax.distributed.initialize(*where, initialization_timeout=args.coordinator_timeout + 60)
    finally:
        timer.cancel()


def replicate(tree, mesh: Mesh):
    """Host arrays (the same on every process) -> arrays replicated on every device of the mesh."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: np.asarray(x)[index]), tree)


def shard_rows(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global host array [B, ...] (the same on every process) -> rows sharded over "data"; each process
    contributes its own contiguous block of rows."""
    local = np.split(x, jax.process_count())[jax.process_index()]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, x.shape)


# ----------------------------------------------------------------------------------------------------------------
# Setting up a run

class Run(NamedTuple):
    """What a run fixes at start-up, for the functions that report, evaluate and checkpoint."""
    args: argparse.Namespace
    cfg: bert.BertConfig
    precision: str
    mesh: Mesh
    rows_per_micro: int  # global rows in one microbatch; batch sizes are multiples of it
    is_main: bool  # process 0, which writes logs and checkpoints
    tokenizer_bytes: bytes
    flops_at: Callable[[int], float]  # training FLOPs per token at a window length
    peak_flops: float  # of one device
    reader: data.TokenReader | None = None  # the training windows, to say what a non-finite step was fed


class Progress(NamedTuple):
    """Where a run is (state.json's fields of the same names)."""
    step: int
    tokens_seen: int
    skipped_steps: int  # steps whose gradients were not finite (fp16), which changed nothing but the loss scale


def load_data(args, resumed: dict | None, is_main: bool) -> tuple[data.TokenReader, bert.BertConfig, bytes]:
    """The training windows, the model config and the tokenizer (tokenizer.json bytes). The data must have been
    made with the tokenizer (--tokenizer, or --init_hf's converted one), a resumed run's with the checkpoint's."""
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
    cfg = (dataclasses.replace(hf_cfg, dropout=args.dropout) if args.init_hf
           else bert.make_config(args.model, reader.vocab_size, dropout=args.dropout, **overrides))
    if args.seq_len > cfg.max_position:
        raise UserError(f"--seq_len {args.seq_len} exceeds the model's max_position {cfg.max_position}")
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
    return reader, cfg, tokenizer_bytes


def initial_state(net, tx, args, resumed: dict | None, precision: str, mesh: Mesh, key) -> tuple[TrainState, Progress]:
    """The checkpoint's state on --resume, else fresh (with --init_hf's weights); replicated on every device."""
    init = partial(init_state, net, tx, seq_len=args.seq_len, num_masked=bert.num_masked(args.seq_len, args.mask_rate),
                   position_init=args.position_init)
    if resumed:
        arrays, template = checkpoint.read_arrays(resumed["path"]), jax.eval_shape(init, key)
        state = replicate(TrainState(checkpoint.unflatten_like(template.params, arrays, "params"),
                                     checkpoint.unflatten_like(template.opt_state, arrays, "opt_state"),
                                     jmp.NoOpLossScale()), mesh)
        at = Progress(resumed["step"], resumed["tokens_seen"], resumed["skipped_steps"])
    else:
        state, at = jax.jit(init, out_shardings=NamedSharding(mesh, P()))(key), Progress(0, 0, 0)
        if args.init_hf:  # its weights; the heads it lacks keep their fresh init
            params, _ = checkpoint.merge_params(jax.device_get(state.params), hf.load_hf(args.init_hf)[1],
                                                args.init_hf)
            state = replicate(TrainState(params, tx.init(params), jmp.NoOpLossScale()), mesh)
    if precision == "fp16":  # the saved scale, unless the run starts (or resumes from fp32/bf16) here
        scale = (resumed and resumed["loss_scale"]) or {"value": args.loss_scale_init, "counter": 0}
        state = state._replace(loss_scale=replicate(
            jmp.DynamicLossScale(np.float32(scale["value"]), np.int32(scale["counter"])), mesh))
    return state, at


def eval_windows(args, tokenizer_sha256: str, rows_per_micro: int) -> np.ndarray:
    """The --eval_windows fixed windows of val.bin [N', T], padded with [PAD] rows to whole microbatches."""
    val = data.TokenReader(args.data_dir, "val", args.seq_len, args.seed, tokenizer_sha256)
    count = min(args.eval_windows, val.num_tokens - args.seq_len + 1)  # more would only repeat windows
    if count < args.eval_windows and jax.process_index() == 0:
        print(f"warning: --eval_windows {args.eval_windows} is more than the {count} windows of {args.seq_len} "
              f"tokens that {args.data_dir}/val.bin holds; evaluating on those {count}", file=sys.stderr)
    windows = np.zeros((-(-count // rows_per_micro) * rows_per_micro, args.seq_len), np.int32)
    windows[:count] = val.batch(0, count)
    return windows


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS.

    XLA:CPU allocates each step's temporaries (~0.85 GB for mini at batch 32) afresh; by default glibc hands
    such large blocks back to the OS on free, so every step page-faults them in again (~20% of a step in
    kernel time). One arena, no mmap and no trimming make the heap reuse them. Call it before JAX (or torch)
    starts threads, i.e. before the first computation. Returns False where mallopt is unavailable (not glibc).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
    return all(mallopt(param, value) == 1
               for param, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))


def measured_peak_flops(dtype) -> float:
    """FLOP/s of a square matmul on one device: the MFU denominator when --peak_flops is not given."""
    n, repeats = (512 if jax.default_backend() == "cpu" else 8192), 10
    peak = 2 * n**3 * repeats / bert.matmul_timer(n, dtype, repeats)(1)
    # CPU devices share the machine's cores, which one device's matmul already uses all of.
    return peak / jax.local_device_count() if jax.default_backend() == "cpu" else peak


# ----------------------------------------------------------------------------------------------------------------
# Wall-clock budget (--max_minutes)

def time_steps(train_step, state: TrainState, reader, shape: tuple[int, int], run: "Run", train_key,
               min_steps: int, min_seconds: float = 0.0) -> tuple[TrainState, float]:
    """Seconds per step at (batch, length), stepping `state` (a scratch copy: the step donates it) on real batches
    with lr 0, each step's metrics read back once the next is dispatched, as the training loop does. The first step
    compiles (or finds the compiled step) and is not timed; then at least min_steps and min_seconds, at most 200."""
    batch, length = shape
    pending, steps, started = None, -1, 0.0
    while steps < min_steps or (time.perf_counter() - started < min_seconds and steps < 200):
        tokens = shard_rows(reader.batch(steps + 1, batch * (run.args.seq_len // length), length), run.mesh)
        state, metrics = train_step(state, tokens, np.int32(steps + 1), np.float32(0.0), train_key,
                                    accum_steps=batch // run.rows_per_micro)
        if pending is None:
            jax.block_until_ready(metrics)  # compiled and run once: the clock starts
            started = time.perf_counter()
        else:
            jax.device_get(pending)
        pending, steps = metrics, steps + 1
    jax.device_get(pending)
    return state, (time.perf_counter() - started) / steps


def budget_max_tokens(train_step, state: TrainState, reader, run: "Run", train_key, deadline: float,
                      eval_once: Callable[[], float] | None) -> tuple[int, dict]:
    """--max_minutes on a fresh run: the max_tokens whose steps and evaluations end by `deadline` (time.monotonic()).

    Times a step of every (batch, length) the schedules use, on a scratch copy of the state (so the run itself is
    exactly the one `--max_tokens N` gives), which also compiles them all now rather than during the run; then one
    evaluation (eval_once: its seconds, compiled on its first call); then fits max_tokens to the time left.
    Every process takes process 0's numbers. -> (max_tokens, what it was fixed from)."""
    args, multiple, timing_started = run.args, run.rows_per_micro, time.monotonic()
    scratch = jax.jit(partial(jax.tree.map, jnp.copy), out_shardings=NamedSharding(run.mesh, P()))(state)
    final = (args.batch_size, args.seq_len)
    measure = min(1.0, 0.01 * (deadline - time.monotonic()))  # the final shape's rate: most of the run's steps
    scratch, final_seconds = time_steps(train_step, scratch, reader, final, run, train_key, 3, measure)
    unit = args.batch_size * args.seq_len
    first_guess = int(multihost_utils.broadcast_one_to_all(
        np.int32(max(1, (deadline - time.monotonic()) / final_seconds))))  # in final batches, the same everywhere
    step_seconds = {final: final_seconds}
    for shape in steps_per_shape(first_guess * unit, args, multiple):
        if shape not in step_seconds:
            scratch, step_seconds[shape] = time_steps(train_step, scratch, reader, shape, run, train_key, 2)
    del scratch
    eval_seconds = 0.0
    if eval_once:
        eval_once()  # compiles
        eval_seconds = eval_once()
    left = 0.97 * (deadline - time.monotonic())  # a margin for the timing's noise
    fits = tokens_within(left, step_seconds, eval_seconds, args, multiple) // unit
    max_tokens = unit * int(multihost_utils.broadcast_one_to_all(np.int32(fits)))
    if args.max_tokens is not None:  # an explicit --max_tokens caps the budget's
        max_tokens = min(max_tokens, args.max_tokens)
    info = dict(max_tokens=max_tokens, seconds_left=left, timing_seconds=time.monotonic() - timing_started, final_tokens_per_s=unit / final_seconds,
                step_seconds={f"{b}x{length}": t for (b, length), t in step_seconds.items()},
                eval_seconds=eval_seconds)
    return max_tokens, info


def budget_line(budget: dict) -> str:
    """Why --max_minutes chose its max_tokens, in one line."""
    return (f"what the steps and evaluations fit into the {budget['seconds_left']:.1f} s left of --max_minutes "
            f"(97%, after {budget['timing_seconds']:.1f} s timing and compiling) at the measured {budget['final_tokens_per_s']:,.0f} tokens/s of full batches, seconds per step "
            + ", ".join(f"{shape} {t:.4f}" for shape, t in budget["step_seconds"].items())
            + f", {budget['eval_seconds']:.2f} s per evaluation")


def timed(fn, *args) -> float:
    """Seconds fn(*args) takes."""
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


# ----------------------------------------------------------------------------------------------------------------
# Reporting, evaluating, checkpointing

class Pending(NamedTuple):
    """A dispatched step, read back once the next one is dispatched (so that the devices never wait on us)."""
    step: int
    tokens_seen: int
    batch_size: int
    length: int  # of its windows (shorter during sequence-length warmup, with as many more windows)
    lr: float
    metrics: dict  # device scalars


@dataclasses.dataclass
class Log:
    """Where a run reports: stdout and tensorboard (process 0), and the history main() returns. The window is the
    train steps since the last stdout line, whose mean loss and throughput that line shows."""
    history: dict
    writer: object | None  # process 0's tensorboardX SummaryWriter; None on the others, which print nothing
    window_losses: list = dataclasses.field(default_factory=list)
    window_accs: list = dataclasses.field(default_factory=list)
    window_start: float | None = None  # None until the first step has finished (compilation is not timed)
    window_tokens: int = 0
    saved_step: int | None = None

    def scalar(self, name: str, value: float, tokens: int) -> None:
        if self.writer:
            self.writer.add_scalar(TAGS[name], value, tokens)

    def line(self, text: str) -> None:
        if self.writer:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def pause(self, started: float) -> None:
        """Leave the time since `started` (an evaluation, a checkpoint) out of the throughput."""
        if self.window_start is not None:
            self.window_start += time.perf_counter() - started


def report(p: Pending | None, at: Progress, log: Log, run: Run) -> Progress:
    """Read back a step's metrics and log them; -> at, counting the step as skipped if its gradients were not
    finite (fp16). A non-finite loss in fp32 or bf16 stops the run; the last good checkpoint stays."""
    if p is None:
        return at
    m = {k: float(v) for k, v in jax.device_get(p.metrics).items()}
    if not m["finite"]:
        if run.precision != "fp16":
            last = checkpoint.latest_checkpoint(run.args.out_dir)
            why = bad_batch(p, run) or "Try a lower --lr, longer warmup, or --precision fp32"
            raise SystemExit(f"error: loss or gradients not finite at step {p.step} (loss {m['loss']}); "
                             f"stopped, last good checkpoint: {last}. {why}")
        at = at._replace(skipped_steps=at.skipped_steps + 1)
    for k, v in (("loss", m["loss"]), ("accuracy", m["accuracy"]), ("lr", p.lr), ("batch_size", p.batch_size),
                 ("grad_norm", m["grad_norm"]), ("loss_scale", m["loss_scale"])):
        log.history[k].append(v)
        log.scalar(k, v, p.tokens_seen)
    log.scalar("step", p.step, p.tokens_seen)
    log.scalar("skipped_steps", at.skipped_steps, p.tokens_seen)
    if m["finite"]:
        log.window_losses.append(m["loss"])
        log.window_accs.append(m["accuracy"])
    now = time.perf_counter()
    if log.window_start is None:
        log.window_start, log.window_tokens = now, p.tokens_seen
    if p.step % run.args.log_every == 0 or p.tokens_seen >= run.args.max_tokens:  # a line, and a new window
        seconds = now - log.window_start
        tok_s = (p.tokens_seen - log.window_tokens) / seconds if seconds > 0 else 0.0
        mfu = tok_s * run.flops_at(p.length) / (run.peak_flops * run.mesh.size)
        loss = np.mean(log.window_losses) if log.window_losses else float("nan")
        acc = np.mean(log.window_accs) if log.window_accs else float("nan")
        speed = f"{tok_s / 1e3:.1f}k tok/s | mfu {mfu:.1%}" if tok_s > 0 else "first step"
        windows = "" if p.length == run.args.seq_len else f" (x{run.args.seq_len // p.length} of {p.length})"
        line = (f"step {p.step} | tokens {p.tokens_seen / 1e6:.2f}M | loss {loss:.4f} | acc {acc:.3f} | "
                f"lr {p.lr:.2e} | batch {p.batch_size}{windows} | gnorm {m['grad_norm']:.3f} | {speed}")
        if run.precision == "fp16":
            line += f" | scale {m['loss_scale']:g} | skipped {at.skipped_steps}"
        log.line(line)
        if tok_s > 0:
            log.scalar("tokens_per_s", tok_s, p.tokens_seen)
            log.scalar("mfu", mfu, p.tokens_seen)
        log.window_losses, log.window_accs, log.window_start, log.window_tokens = [], [], now, p.tokens_seen
    return at


def bad_batch(p: Pending, run: Run) -> str | None:
    """What in step p's batch, read again, explains a non-finite loss other than the optimiser's settings: token
    ids beyond the vocabulary (whose embedding rows do not exist). None if nothing."""
    if run.reader is None:
        return None
    args = run.args
    tokens = run.reader.batch(p.step - 1, p.batch_size * (args.seq_len // p.length), p.length)  # as the loop read it
    bad = tokens[tokens >= run.cfg.vocab_size]
    if not len(bad):
        return None
    tokenizer = "TOK.json" if args.init_hf else args.tokenizer
    return (f"Its batch holds {len(bad)} token id(s) not below the vocabulary size {run.cfg.vocab_size} (such as "
            f"{int(bad.max())}): {args.data_dir} is damaged or was made with another tokenizer; check it with "
            f"python data.py --verify --out {args.data_dir} --tokenizer {tokenizer}")


def eval_metrics(eval_step, params, windows: np.ndarray, run: Run) -> tuple[float, float]:
    """MLM loss and accuracy on the fixed evaluation windows."""
    sums = np.zeros(3)
    rows = np.arange(len(windows), dtype=np.int32)  # each row's masks come from its index
    for i in range(0, len(windows), run.rows_per_micro):
        chunk = (shard_rows(x[i:i + run.rows_per_micro], run.mesh) for x in (windows, rows))
        sums += [float(v) for v in eval_step(params, *chunk)]
    loss, acc = sums[:2] / sums[2]  # weighted means over the masked positions
    return loss, acc


def evaluate(eval_step, params, windows: np.ndarray, at: Progress, log: Log, run: Run) -> None:
    """MLM loss and accuracy on the fixed evaluation windows, logged."""
    started = time.perf_counter()
    loss, acc = eval_metrics(eval_step, params, windows, run)
    log.history["eval"].append(dict(step=at.step, tokens=at.tokens_seen, loss=loss, accuracy=acc))
    log.scalar("eval_loss", loss, at.tokens_seen)
    log.scalar("eval_accuracy", acc, at.tokens_seen)
    log.line(f"eval step {at.step} | tokens {at.tokens_seen / 1e6:.2f}M | loss {loss:.4f} | acc {acc:.3f}")
    log.pause(started)


def save(state: TrainState, at: Progress, log: Log, run: Run) -> None:
    """A checkpoint of this step (written by process 0), unless there is one already."""
    if log.saved_step == at.step:
        return
    started = time.perf_counter()
    arrays = {**checkpoint.flatten(state.params, "params"), **checkpoint.flatten(state.opt_state, "opt_state")}
    ls = state.loss_scale
    scale = {"value": float(ls.loss_scale), "counter": int(ls.counter)} if run.precision == "fp16" else None
    info = checkpoint.run_state(step=at.step, tokens_seen=at.tokens_seen, skipped_steps=at.skipped_steps,
                                cfg=run.cfg, precision=run.precision, loss_scale=scale, seed=run.args.seed,
                                tokenizer_sha256=common.sha256_bytes(run.tokenizer_bytes), args=vars(run.args),
                                num_devices=run.mesh.size)
    try:
        path = (checkpoint.save_checkpoint(run.args.out_dir, info, arrays, run.tokenizer_bytes, run.args.keep_ckpts)
                if run.is_main else None)
    except UserError as e:  # a full disk: the temporary folder is gone, the earlier checkpoints stay
        kept = checkpoint.latest_checkpoint(run.args.out_dir)
        raise UserError(f"{e}; the checkpoint of step {at.step} is not saved, " + (
            f"the newest one kept is {kept}: make room, then continue from it with --resume" if kept else
            "and there is no earlier one")) from None
    log.history["checkpoints"].append(path)
    log.saved_step = at.step
    log.pause(started)


@dataclasses.dataclass
class StopRequest:
    """The signal handler for SIGINT and SIGTERM: the loop then checkpoints and stops; a second signal stops at
    once, without a checkpoint."""
    signum: int | None = None
    every: int = 10  # processes agree on stopping every this many steps, as agreeing waits for the step in flight

    def __call__(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum


def start_line(run: Run, state: TrainState, at: Progress, resumed: dict | None) -> str:
    """The line a run starts with: the model, its size and FLOPs, precision, devices, the MFU peak, the start."""
    args = run.args
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    start_from = f"resuming from {resumed['path']}" if resumed else f"from {args.init_hf or 'scratch'}"
    decoding = " (decoding all positions)" if args.decode_all else ""
    return (f"model {args.init_hf or args.model} {run.cfg}: {n_params / 1e6:.2f}M params, "
            f"{run.flops_at(args.seq_len) / 1e6:.1f} MFLOP/token{decoding}; {run.precision}; "
            f"{run.mesh.size} devices x {run.rows_per_micro // run.mesh.size} sequences per microbatch; "
            f"peak {run.peak_flops / 1e12:.2f} TFLOP/s/device{' (measured matmul)' if not args.peak_flops else ''}; "
            f"{start_from} at step {at.step}")


def open_log(out_dir: str, is_main: bool, start_step: int, num_devices: int) -> Log:
    """An empty history, and process 0's tensorboard writer in out_dir/tb."""
    writer = None
    if is_main:  # the only process that writes: the others never create out_dir
        from tensorboardX import SummaryWriter
        common.make_folder(out_dir)
        with common.writing(os.path.join(out_dir, "tb")):
            writer = SummaryWriter(os.path.join(out_dir, "tb"))
    history = dict(loss=[], accuracy=[], lr=[], batch_size=[], grad_norm=[], loss_scale=[], eval=[],
                   num_devices=num_devices, start_step=start_step, checkpoints=[])
    return Log(history, writer)


def close_log(writer, out_dir: str) -> str | None:
    """Close the tensorboard writer; -> None, or what was lost if the disk refused its last events (a full disk
    that also stopped a checkpoint says so itself). Then the writer is stopped all the same, so that
    tensorboardX's own retry at exit cannot fail again with a traceback."""
    try:
        writer.close()
        return None
    except OSError as e:
        if e.errno not in common.DISK_ERRNOS:
            raise
        for file_writer in (writer.all_writers or {}).values():
            events = file_writer.event_writer
            if not events._closed:  # tensorboardX's EventFileWriter.close, less the flush that failed
                events._worker.stop()
                events._closed = True
        writer.all_writers = None
        return f"the tensorboard log in {out_dir}/tb lacks its last events: {e.strerror}"


# ----------------------------------------------------------------------------------------------------------------
# Main

def main(argv: list[str] | None = None) -> dict:
    """Train; returns the history of this run (per-step losses, evals, ...), for tests and notebooks."""
    started = time.monotonic()  # --max_minutes counts from here
    args, resumed = train_flags.parse_args(argv, __doc__)
    setup_distributed(args)
    num_devices, is_main = jax.device_count(), jax.process_index() == 0
    rows_per_micro = train_flags.check_config(args, num_devices)
    if is_main:  # the only process that writes
        common.check_writable_folder(args.out_dir)
    reader, cfg, tokenizer_bytes = load_data(args, resumed, is_main)
    train_flags.check_memory(cfg, jax.local_devices()[0], jax.local_device_count())
    train_flags.check_tokens_left(args, resumed)
    precision = args.precision or (resumed["precision"] if resumed else bert.default_precision())
    policy = bert.set_precision(precision)
    net, mesh = bert.mlm_model(cfg), Mesh(np.array(jax.devices()), ("data",))
    tx = bert.make_optimizer(weight_decay=args.weight_decay, b1=args.b1, b2=args.b2, eps=args.eps,
                             clip_norm=args.grad_clip)
    init_key, train_key, eval_key = (jax.random.fold_in(jax.random.PRNGKey(args.seed), i) for i in range(3))
    state, at = initial_state(net, tx, args, resumed, precision, mesh, init_key)
    train_step = make_train_step(net, tx, cfg, args.mask_rate, mesh, args.decode_all)
    train_key = replicate(np.asarray(train_key), mesh)
    run = Run(args, cfg, precision, mesh, rows_per_micro, is_main, tokenizer_bytes,
              partial(bert.flops_per_token, cfg, mask_rate=args.mask_rate,
                      decoded_fraction=1.0 if args.decode_all else None),
              args.peak_flops or measured_peak_flops(policy.compute_dtype), reader)
    if args.eval_windows:
        windows = eval_windows(args, common.sha256_bytes(tokenizer_bytes), run.rows_per_micro)
        eval_step = make_eval_step(net, cfg, args.mask_rate, eval_key, mesh)
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    budget = None
    if deadline is not None and not resumed:  # a resumed run keeps the schedule its checkpoint fixed
        eval_once = (lambda: timed(eval_metrics, eval_step, state.params, windows, run)) if args.eval_windows else None
        args.max_tokens, budget = budget_max_tokens(train_step, state, reader, run, train_key, deadline, eval_once)
        if args.max_tokens < train_flags.ramp_start(args) * args.seq_len:
            raise UserError(f"--max_minutes {args.max_minutes} leaves no time for one batch ({budget_line(budget)}); "
                            "give more minutes or a smaller model or batch")
        if is_main:
            print(f"max_tokens {args.max_tokens:,} ({args.max_tokens / 1e6:.1f}M): {budget_line(budget)}", flush=True)
    log = open_log(args.out_dir, is_main, at.step, num_devices)
    log.history["budget"] = budget
    bar = tqdm(total=args.max_tokens, initial=min(at.tokens_seen, args.max_tokens), unit="tok", unit_scale=True,
               disable=None if is_main else True, dynamic_ncols=True)
    pending, stop, stopping, out_of_time = None, StopRequest(), False, False
    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    log.line(start_line(run, state, at, resumed))  # from this line on, a signal makes a checkpoint
    try:
        while at.tokens_seen < args.max_tokens and not stopping and not out_of_time:
            batch, length = shape_at(at.tokens_seen, args.max_tokens, args, run.rows_per_micro)
            before, after = at.tokens_seen, at.tokens_seen + batch * args.seq_len
            lr = lr_at(after, peak=args.lr, max_tokens=args.max_tokens, warmup_frac=args.warmup_frac,
                       final_frac=args.final_lr_frac, anneal=args.anneal)
            # The same tokens per step at every length: batch x seq_len/length windows of `length` tokens.
            tokens = shard_rows(reader.batch(at.step, batch * (args.seq_len // length), length), mesh)  # [B', T']
            state, metrics = train_step(state, tokens, np.int32(at.step), np.float32(lr), train_key,
                                        accum_steps=batch // run.rows_per_micro)
            at = report(pending, at, log, run)._replace(step=at.step + 1, tokens_seen=after)  # the step before
            pending = Pending(at.step, after, batch, length, lr, metrics)
            bar.update(min(after, args.max_tokens) - min(before, args.max_tokens))
            if jax.process_count() == 1 or at.step % stop.every == 0:  # all processes stop at the same step
                stopping = bool(multihost_utils.process_allgather(np.int32(stop.signum is not None)).max())
            if deadline is not None and (jax.process_count() == 1 or at.step % stop.every == 0):
                out_of_time = bool(multihost_utils.process_allgather(np.int32(time.monotonic() > deadline)).max())
            if args.eval_windows and crossed(before, after, args.eval_every):
                at, pending = report(pending, at, log, run), None
                evaluate(eval_step, state.params, windows, at, log, run)
            if crossed(before, after, args.ckpt_every):
                at, pending = report(pending, at, log, run), None  # never save a state whose step is unchecked
                save(state, at, log, run)
        at = report(pending, at, log, run)
        if stopping:
            signum = stop.signum or signal.SIGTERM  # a process the signal missed stops as if it had a SIGTERM
            save(state, at, log, run)
            if is_main:
                print(f"stopped by {signal.Signals(signum).name} at step {at.step}; checkpoint "
                      f"{log.history['checkpoints'][-1]}; continue with --resume", file=sys.stderr, flush=True)
            sys.exit(128 + signum)
        if out_of_time and at.tokens_seen < args.max_tokens and is_main:
            print(f"warning: --max_minutes {args.max_minutes} ran out at {at.tokens_seen:,} of --max_tokens "
                  f"{args.max_tokens:,} tokens: the schedule did not finish; stopped with a checkpoint (continue "
                  f"with --resume --max_minutes M)", file=sys.stderr, flush=True)
        if args.eval_windows and not (log.history["eval"] and log.history["eval"][-1]["step"] == at.step):
            evaluate(eval_step, state.params, windows, at, log, run)
        save(state, at, log, run)
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        bar.close()
        lost = close_log(log.writer, args.out_dir) if log.writer else None
    if lost:  # the run and its checkpoints are complete
        print(f"warning: {lost}", file=sys.stderr)
    log.history.update(skipped_steps=at.skipped_steps, compiles=train_step._cache_size(), max_tokens=args.max_tokens,
                       out_of_time=out_of_time and at.tokens_seen < args.max_tokens)
    return log.history


if __name__ == "__main__":
    keep_freed_memory()  # before JAX's first computation starts its threads
    common.run_main(main)
