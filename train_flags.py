"""train.py's flags: their definitions and --help, which of them decide a run's numbers (a resumed run says when
one changed) and which only how it runs, how --resume fills in the saved ones, and the checks made before any work.
"""
import argparse
import math
import os

import checkpoint
import model as bert
from common import UserError

# Flags that change how a run is executed or reported, never its numbers; a resumed run may change them freely.
OPERATIONAL_FLAGS = {"data_dir", "tokenizer", "out_dir", "resume", "log_every", "eval_every", "ckpt_every",
                     "keep_ckpts", "peak_flops", "micro_batch_size", "decode_all", "coordinator", "num_processes",
                     "process_id", "max_minutes"}  # max_minutes fixes max_tokens once, at a fresh run's start
# Flags that decide the numbers: a resumed run that changes one says so. Every flag is in one of the two sets
# (tests/test_train_flags.py checks).
NUMERIC_FLAGS = {"seed", "model", "num_layers", "hidden_size", "num_heads", "intermediate_size", "post_ln", "init_hf",
                 "position_init", "dropout", "seq_len", "seq_len_start", "seq_warmup_frac", "mask_rate", "precision",
                 "loss_scale_init", "lr", "warmup_frac", "final_lr_frac", "anneal", "weight_decay", "b1", "b2", "eps",
                 "grad_clip", "max_tokens", "batch_size", "batch_size_start", "batch_warmup_frac", "eval_windows"}
DEFAULT_MAX_TOKENS = 2_000_000
PER_PROCESS_FLAGS = {"out_dir", "resume", "coordinator", "num_processes", "process_id"}


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


def build_parser(description: str) -> argparse.ArgumentParser:
    """train.py's flags; description: its --help text."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    g.add_argument("--max_tokens", type=parse_count,
                   help="train on this many tokens (sequences x seq_len); suffixes k/M/B; with --max_minutes, "
                        "the most it may choose (default: 2M, the quick start: about 10 minutes of mini on a "
                        "2-core CPU; with --max_minutes, no cap)")
    g.add_argument("--max_minutes", type=float, default=0.0,
                   help="wall-clock budget: a fresh run times a step of every batch/window shape its schedules "
                        "use (on a scratch copy, compiling them) and one evaluation, then fixes --max_tokens to "
                        "what fits in the minutes left (counted from start-up; checkpoints not included), so that "
                        "the one-cycle schedule, batch ramp and sequence-length warmup end at the budget; it prints "
                        "the chosen count and saves it with the flags, and --resume continues that schedule. The "
                        "training loop also stops at the deadline, with a checkpoint, should the steps run slower "
                        "than timed. 0 = no budget (default: 0)")
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


def parse_args(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, dict | None]:
    """Flags, and with --resume the latest checkpoint's state (its saved flags fill in the ones not given)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if not args.resume:
        if args.max_tokens is None and not args.max_minutes:
            args.max_tokens = DEFAULT_MAX_TOKENS
        return args, None
    path = checkpoint.latest_checkpoint(args.out_dir, skip_damaged=True)
    if path is None:
        raise UserError(f"--resume: no complete checkpoint in {args.out_dir}")
    saved = checkpoint.read_state(path)
    if not isinstance(saved.get("args"), dict):
        raise UserError(f"--resume: {path}/state.json is not a train.py checkpoint's (it has no flags)")
    seeded = {k: v for k, v in saved["args"].items() if k not in PER_PROCESS_FLAGS}
    args = parser.parse_args(argv, namespace=argparse.Namespace(**seeded))  # given flags override saved ones
    saved["changed"] = [f"--{k} {getattr(args, k)} (was {v})" for k, v in sorted(saved["args"].items())
                        if k in NUMERIC_FLAGS and getattr(args, k, v) != v]
    saved["path"] = path
    return args, saved


def check_config(args, num_devices: int) -> int:
    """Impossible or meaningless flag combinations, found before any work is done; -> global rows per microbatch."""
    for name in ("seq_len", "batch_size", "log_every", "keep_ckpts"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup_frac", "final_lr_frac", "batch_warmup_frac", "seq_warmup_frac"):
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
    if short < 1 or args.seq_len % short or (args.seq_len // short).bit_count() != 1:
        raise UserError(f"--seq_len {args.seq_len} must be --seq_len_start {args.seq_len_start} times a power of 2")
    if not 0 <= args.max_minutes < math.inf:
        raise UserError(f"--max_minutes must be >= 0 (0 = no budget), got {args.max_minutes}")
    if args.max_tokens is not None and args.max_tokens < start * args.seq_len:
        raise UserError(f"--max_tokens {args.max_tokens} is less than one batch ({start} x {args.seq_len} tokens)")
    return micro * num_devices


def ramp_start(args: argparse.Namespace) -> int:
    """The batch size the ramp starts from (--batch_size_start; 0 = no ramp)."""
    if args.batch_size_start is None:
        return min(32, args.batch_size)
    return args.batch_size_start or args.batch_size
