"""train.py's flags: their definitions and --help, which of them decide a run's numbers (a resumed run says when
one changed) and which only how it runs, how --resume fills in the saved ones, and the checks made before any work.
"""
import argparse
import math
import os

import checkpoint
import common
import model as bert
from common import UserError

# Flags that change how a run is executed or reported, never its numbers; a resumed run may change them freely.
OPERATIONAL_FLAGS = {"data_dir", "tokenizer", "out_dir", "resume", "log_every", "eval_every", "ckpt_every",
                     "keep_ckpts", "peak_flops", "micro_batch_size", "decode_all", "coordinator", "num_processes",
                     "process_id", "coordinator_timeout",
                     "max_minutes"}  # max_minutes fixes max_tokens once, at a fresh run's start: it is saved
# Flags that decide the numbers: a resumed run that changes one says so. Every flag is in one of the two sets
# (tests/test_train_flags.py checks).
NUMERIC_FLAGS = {"seed", "model", "num_layers", "hidden_size", "num_heads", "intermediate_size", "post_ln", "init_hf",
                 "position_init", "dropout", "seq_len", "seq_len_start", "seq_warmup_frac", "mask_rate", "precision",
                 "loss_scale_init", "lr", "warmup_frac", "final_lr_frac", "anneal", "weight_decay", "b1", "b2", "eps",
                 "grad_clip", "max_tokens", "batch_size", "batch_size_start", "batch_warmup_frac", "eval_windows"}
DEFAULT_MAX_TOKENS = 2_000_000
PER_PROCESS_FLAGS = {"out_dir", "resume", "coordinator", "num_processes", "process_id", "coordinator_timeout"}
# No machine trains a BERT on more tokens: 1e15 is about 7000 times the 137B tokens of BERT's own pretraining.
MAX_TOKENS = 10**15


def parse_count(text: str) -> int:
    """'1B', '2.5M', '500k', '1e6', '1_000_000' -> int (token counts)."""
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}.get(s[-1:].lower(), 1)
    try:
        value = float(s[:-1] if scale > 1 else s) * scale
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a count >= 0 such as 500k, 10M, 1.5B or 1e9, got {text!r}")
    return int(round(value))


def token_budget(text: str) -> int:
    """--max_tokens: a count (parse_count) from 1 to MAX_TOKENS."""
    value = parse_count(text)
    if not 1 <= value <= MAX_TOKENS:
        raise argparse.ArgumentTypeError(f"must be a count in [1, {MAX_TOKENS:.0e}] (no machine trains more), "
                                         f"got {text!r}")
    return value


def coordinator_address(text: str) -> str:
    """--coordinator: 'auto', or HOST:PORT with a port in [1, 65535]."""
    host, _, port = text.rpartition(":")
    if text != "auto" and not (host and port.isdigit() and 1 <= int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"must be HOST:PORT (a port in [1, 65535]) or 'auto', got {text!r}")
    return text


def build_parser(description: str) -> argparse.ArgumentParser:
    """train.py's flags; description: its --help text."""
    p = common.ArgumentParser(description)
    g = p.add_argument_group("data and output")
    g.add_argument("--data_dir", default="data", help="folder written by data.py (default: data)")
    g.add_argument("--tokenizer", default="tokenizer.json",
                   help="tokenizer.json the data was made with; checked against the data's meta.json and, on "
                        "--resume, the checkpoint's copy (default: tokenizer.json)")
    g.add_argument("--out_dir", default="out", help="checkpoints and tensorboard logs go here (default: out)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out_dir from its latest complete checkpoint, with the flags saved "
                        "there (flags given now override them; changing one that affects the numbers is reported)")
    g.add_argument("--seed", type=common.seed, default=0,
                   help=f"seeds init, data order and masking; 0 to {common.MAX_SEED} (default: 0)")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mini", choices=list(bert.PRESETS),
                   help="size preset: tiny L2/H128, mini L4/H256, small L4/H512, medium L8/H512, base L12/H768, "
                        "large L24/H1024; heads H/64, MLP 4H (default: mini)")
    g.add_argument("--num_layers", type=common.positive_int, help="override the preset's number of layers")
    g.add_argument("--hidden_size", type=common.positive_int, help="override the preset's hidden size")
    g.add_argument("--num_heads", type=common.positive_int,
                   help="override the number of attention heads (default: hidden/64)")
    g.add_argument("--intermediate_size", type=common.positive_int, help="override the MLP width (default: 4*hidden)")
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
    g.add_argument("--dropout", type=common.float_in(0, 1, open_high=True), default=0.0,
                   help="hidden and attention dropout (default: 0.0)")
    g.add_argument("--seq_len", type=common.positive_int, default=128, help="tokens per training window (default: 128)")
    g.add_argument("--seq_len_start", type=common.positive_int,
                   help="sequence-length warmup: train on windows of this length first, doubling up to --seq_len "
                        "in equal stages over --seq_warmup_frac of --max_tokens, with the same tokens per step "
                        "(more, shorter windows); --seq_len / --seq_len_start must be a power of 2 (default: "
                        "--seq_len, no warmup)")
    g.add_argument("--seq_warmup_frac", type=common.fraction, default=0.5,
                   help="the sequence-length warmup spans this fraction of --max_tokens (default: 0.5)")
    g.add_argument("--mask_rate", type=common.float_in(0, 1, open_low=True, open_high=True), default=0.15,
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
    g.add_argument("--loss_scale_init", type=common.positive_float, default=2.0**15,
                   help="fp16 only: initial dynamic loss scale; a resumed fp16 run keeps its saved scale "
                        "(default: 32768)")

    g = p.add_argument_group("optimiser (AdamW; no weight decay on biases and LayerNorm)")
    g.add_argument("--lr", type=common.positive_float, default=1e-3, help="peak learning rate (default: 1e-3)")
    g.add_argument("--warmup_frac", type=common.fraction, default=0.06,
                   help="linear warmup from 0 to --lr over this fraction of --max_tokens (default: 0.06)")
    g.add_argument("--final_lr_frac", type=common.fraction, default=0.0,
                   help="the learning rate anneals to --lr times this at --max_tokens (default: 0.0)")
    g.add_argument("--anneal", choices=["cos", "linear"], default="cos",
                   help="shape of the decay after warmup (default: cos)")
    g.add_argument("--weight_decay", type=common.non_negative_float, default=0.01,
                   help="decoupled weight decay (default: 0.01)")
    g.add_argument("--b1", type=common.float_in(0, 1, open_high=True), default=0.9,
                   help="Adam beta1, in [0, 1) (default: 0.9)")
    g.add_argument("--b2", type=common.float_in(0, 1, open_high=True), default=0.98,
                   help="Adam beta2, in [0, 1) (default: 0.98)")
    g.add_argument("--eps", type=common.positive_float, default=1e-6, help="Adam epsilon, > 0 (default: 1e-6)")
    g.add_argument("--grad_clip", type=common.non_negative_float, default=1.0,
                   help="clip gradients to this global norm; 0 = no clipping (default: 1.0)")

    g = p.add_argument_group("batch and length")
    g.add_argument("--max_tokens", type=token_budget,
                   help="train on this many tokens (sequences x seq_len); suffixes k/M/B; at most 1e15, more than "
                        "any machine trains a BERT on; with --max_minutes, the most it may choose (default: 2M, the "
                        "quick start: about 10 minutes of mini on a 2-core CPU; with --max_minutes, no cap)")
    g.add_argument("--max_minutes", type=common.non_negative_float, default=0.0,
                   help="wall-clock budget: a fresh run times a step of every batch/window shape its schedules "
                        "use (on a scratch copy, compiling them) and one evaluation, then fixes --max_tokens to "
                        "what fits in the minutes left (counted from start-up; checkpoints not included), so that "
                        "the one-cycle schedule, batch ramp and sequence-length warmup end at the budget; it prints "
                        "the chosen count and saves it with the flags, and --resume continues that schedule. The "
                        "training loop also stops at the deadline, with a checkpoint, should the steps run slower "
                        "than timed. 0 = no budget (default: 0)")
    g.add_argument("--batch_size", type=common.positive_int, default=64,
                   help="global batch size in sequences (default: 64)")
    g.add_argument("--batch_size_start", type=common.non_negative_int,
                   help="ramp the batch size linearly from this to --batch_size; 0 = no ramp (default: 32, or "
                        "--batch_size if smaller)")
    g.add_argument("--batch_warmup_frac", type=common.fraction, default=0.1,
                   help="the batch-size ramp spans this fraction of --max_tokens (default: 0.1)")
    g.add_argument("--micro_batch_size", type=common.positive_int,
                   help="sequences per device per forward/backward pass; each step accumulates gradients over "
                        "batch / (micro_batch_size x devices) microbatches; batch sizes are rounded to multiples "
                        "of micro_batch_size x devices (default: the starting batch over the devices)")

    g = p.add_argument_group("evaluation, logging, checkpoints")
    g.add_argument("--eval_every", type=parse_count, default=parse_count("1M"),
                   help="evaluate every this many tokens, and at the end; 0 = only at the end (default: 1M)")
    g.add_argument("--eval_windows", type=common.non_negative_int, default=512,
                   help="evaluate MLM loss and accuracy on this many fixed windows of val.bin, with fixed masks "
                        "(at most as many as val.bin has windows; more are cut to that, with a warning); 0 = no "
                        "evaluation (default: 512)")
    g.add_argument("--log_every", type=common.positive_int, default=50,
                   help="print a line every this many steps (default: 50)")
    g.add_argument("--ckpt_every", type=parse_count, default=parse_count("1M"),
                   help="checkpoint every this many tokens, and at the end; 0 = only at the end (default: 1M)")
    g.add_argument("--keep_ckpts", type=common.positive_int, default=3,
                   help="keep the last this many checkpoints (default: 3)")
    g.add_argument("--peak_flops", type=common.non_negative_float, default=0.0,
                   help="peak FLOP/s of one device, for MFU; 0 = measure a dense matmul in the compute dtype at "
                        "startup (MFU is then relative to achievable, not datasheet, throughput) (default: 0)")

    g = p.add_argument_group("multi-host (one process per host)")
    g.add_argument("--coordinator", type=coordinator_address,
                   help="HOST:PORT of process 0 for jax.distributed.initialize, or 'auto' to detect the cluster "
                        "(TPU pod, SLURM, ...) (default: single process)")
    g.add_argument("--num_processes", type=common.positive_int,
                   help="number of processes (with --coordinator HOST:PORT)")
    g.add_argument("--process_id", type=common.non_negative_int,
                   help="this process's index (with --coordinator HOST:PORT)")
    g.add_argument("--coordinator_timeout", type=common.int_in(1), default=300,
                   help="seconds to wait for the coordinator and every process to join; then stop with an error "
                        "(default: 300)")
    return p


def parse_args(argv: list[str] | None, description: str) -> tuple[argparse.Namespace, dict | None]:
    """Flags, and with --resume the latest checkpoint's state (its saved flags fill in the ones not given)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    if not args.resume:
        if args.max_tokens is None and not args.max_minutes:
            args.max_tokens = DEFAULT_MAX_TOKENS
        return args, None
    path = checkpoint.latest_checkpoint(args.out_dir, skip_damaged=True, fields=checkpoint.RESUME_FIELDS)
    if path is None:
        raise UserError(f"--resume: no complete checkpoint in {args.out_dir}")
    saved = checkpoint.read_state(path, checkpoint.RESUME_FIELDS)
    seeded = {k: v for k, v in saved["args"].items() if k not in PER_PROCESS_FLAGS}
    args = parser.parse_args(argv, namespace=argparse.Namespace(**seeded))  # given flags override saved ones
    saved["changed"] = [f"--{k} {getattr(args, k)} (was {v})" for k, v in sorted(saved["args"].items())
                        if k in NUMERIC_FLAGS and getattr(args, k, v) != v]
    saved["path"] = path
    return args, saved


def check_tokens_left(args, resumed: dict | None) -> None:
    """A resumed run must have tokens left to train on: else it would end at once, having done nothing."""
    done = resumed and resumed.get("tokens_seen")
    if isinstance(done, int) and args.max_tokens <= done:
        raise UserError(f"--resume: checkpoint {resumed['path']} has trained on {done} tokens already, not fewer "
                        f"than --max_tokens {args.max_tokens}: nothing to train; give a larger --max_tokens to go on")


def check_config(args, num_devices: int) -> int:
    """Impossible or meaningless flag combinations, found before any work is done; -> global rows per microbatch.
    (Each flag's own domain is its argparse type's.)"""
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
    if args.max_tokens is not None and args.max_tokens < start * args.seq_len:
        raise UserError(f"--max_tokens {args.max_tokens} is less than one batch ({start} x {args.seq_len} tokens)")
    return micro * num_devices


# Training keeps fp32 params, gradients and two Adam moments per parameter on every device, at the least.
TRAIN_BYTES_PER_PARAM = 16


def check_memory(cfg: bert.BertConfig, device, devices_per_host: int) -> None:
    """Refuse a model whose parameters, gradients and Adam moments alone exceed a device's memory (the host's RAM,
    shared by its devices, on CPU), before anything is built: such a run would only page or fail much later."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        have, where = stats["bytes_limit"], f"{device.device_kind} memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // devices_per_host, "RAM"
    params = bert.num_params(cfg)
    need = TRAIN_BYTES_PER_PARAM * params
    if need > have:
        raise UserError(f"the model has {params / 1e6:,.0f}M parameters: training needs at least "
                        f"{need / 2**30:,.1f} GiB per device ({TRAIN_BYTES_PER_PARAM} bytes each), more than its "
                        f"{have / 2**30:,.1f} GiB of {where}; choose a smaller --model or shape (--num_layers, "
                        "--hidden_size, ...)")


def ramp_start(args: argparse.Namespace) -> int:
    """The batch size the ramp starts from (--batch_size_start; 0 = no ramp)."""
    if args.batch_size_start is None:
        return min(32, args.batch_size)
    return args.batch_size_start or args.batch_size
