"""Training-step throughput and MFU of model.py, next to Hugging Face transformers' BertForMaskedLM.

A step is train.py's own (train.make_train_step with train.py's default flags): masking, forward, backward,
gradient clipping, AdamW with its decay mask, the metrics and the loss scale, in one jitted function that donates
its buffers. MFU = flops_per_token * tokens/s / peak, where peak is a square matmul timed in this
same run (fp32 on CPU; in the compute dtype for bf16/fp16). Tokens are synthetic: speed does not depend on
them. On CPU ours runs as train.py does: one JAX device, whose ops XLA's threads spread over the cores.
With --separate, each framework runs alone in a fresh process, as a user would run it, in alternating rounds; the
ratios are medians of per-round ratios. The transformers comparison (PyTorch, CPU) is a benchmark-only extra:
    pip install torch==2.13.0 transformers   (the CPU build)

    python bench.py --model mini --separate 3          # ours vs transformers, each alone in its own process
    python bench.py --model mini                       # ours vs transformers in one process (interleaved)
    python bench.py --model small --sweep              # plus microbatch sizes and accumulation steps
    python bench.py --model base --precision bf16      # on a GPU: MFU against the measured bf16 peak
"""
import argparse
import collections
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Callable

# On a GPU, JAX would take 75% of its memory at start-up and leave transformers' PyTorch too little.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import tqdm  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import common  # noqa: E402
import model  # noqa: E402
import train  # noqa: E402
import train_flags  # noqa: E402


# ----------------------------------------------------------------------------------------------------------
# Our training step: train.py's own

class OurRunner:
    """train.make_train_step as train.py runs it with its default flags (masking, forward, backward, clipping,
    AdamW with its decay mask, the metrics, the loss scale), over every device. run(n) takes n steps and returns
    the seconds they took."""

    def __init__(self, cfg, batch_size, seq_len, mask_rate, accum_steps=1):
        flags = train_flags.build_parser("").parse_args([])
        net = model.mlm_model(cfg)
        tx = model.make_optimizer(weight_decay=flags.weight_decay, b1=flags.b1, b2=flags.b2, eps=flags.eps,
                                  clip_norm=flags.grad_clip)
        mesh = Mesh(np.array(jax.devices()), ("data",))
        self.step = train.make_train_step(net, tx, cfg, mask_rate, mesh)
        init = partial(train.init_state, net, tx, seq_len=seq_len, num_masked=model.num_masked(seq_len, mask_rate))
        self.state = jax.jit(init, out_shardings=NamedSharding(mesh, P()))(jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        tokens = rng.integers(model.NUM_SPECIAL, cfg.vocab_size, (batch_size, seq_len)).astype(np.int32)
        self.tokens = train.shard_rows(tokens, mesh)  # [B, T]
        self.key = train.replicate(np.asarray(jax.random.PRNGKey(1)), mesh)
        self.accum_steps, self.lr, self.steps = accum_steps, np.float32(flags.lr), 0
        self.run(1)  # compile

    def run(self, steps: int) -> float:
        """Take `steps` training steps; returns the seconds they took."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, self.tokens, np.int32(self.steps), self.lr, self.key,
                                            accum_steps=self.accum_steps)
            self.steps += 1
        jax.block_until_ready((self.state, metrics))
        return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------
# transformers' BertForMaskedLM (PyTorch)

class HFRunner:
    """transformers on PyTorch's CPU build, or on CUDA (with autocast to bf16/fp16) when torch sees a GPU."""

    def __init__(self, cfg, batch_size, seq_len, mask_rate, dropout, precision="fp32"):
        try:
            import torch
            import transformers
        except ImportError:
            raise common.UserError("the comparison needs the benchmark extras: "
                                   "pip install torch==2.13.0 transformers (or pass --no-hf)") from None
        torch.manual_seed(0)
        hf_config = transformers.BertConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
            max_position_embeddings=cfg.max_position, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.autocast = torch.autocast(self.device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            precision, torch.float32), enabled=precision != "fp32")
        self.scaler = torch.amp.GradScaler(self.device, enabled=precision == "fp16")
        self.model = transformers.BertForMaskedLM(hf_config).to(self.device).train()
        self.attention = self.model.config._attn_implementation
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
        # The same masking as ours (done outside the timed step: it is cheap either way).
        key = jax.random.PRNGKey(1)
        tokens = np.random.default_rng(0).integers(model.NUM_SPECIAL, cfg.vocab_size, (batch_size, seq_len))
        inputs, positions, targets, _ = model.mask_tokens(key, jnp.asarray(tokens, jnp.int32), mask_rate,
                                                          cfg.vocab_size)
        labels = np.full(tokens.shape, -100)
        np.put_along_axis(labels, np.asarray(positions), np.asarray(targets), axis=1)
        self.inputs = torch.as_tensor(np.asarray(inputs), dtype=torch.long, device=self.device)
        self.labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        self.torch = torch
        self.run(1)  # warm up

    def run(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with self.autocast:
                loss = self.model(input_ids=self.inputs, labels=self.labels).loss
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        if self.device == "cuda":
            self.torch.cuda.synchronize()
        return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------------------

def interleaved(runners: dict[str, Callable[[int], float]], steps: int, rounds: int,
                cpu_times: dict | None = None) -> dict[str, np.ndarray]:
    """Seconds per step of each runner in each of `rounds` rounds that take turns, so that background load
    on a shared machine hits all of them alike: compare runners within a round, then take medians.
    If cpu_times is given, it receives the process CPU seconds per step likewise."""
    times = {name: [] for name in runners}
    for _ in tqdm.trange(rounds, desc="timing rounds", leave=False):
        for name, run in runners.items():
            cpu_start = time.process_time()
            times[name].append(run(steps) / steps)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append((time.process_time() - cpu_start) / steps)
    return {name: np.array(t) for name, t in times.items()}


def build_parser() -> common.ArgumentParser:
    parser = common.ArgumentParser(__doc__)
    parser.add_argument("--model", default="mini", choices=list(model.PRESETS), help="model size preset")
    parser.add_argument("--precision", default="fp32", choices=list(model.PRECISIONS), help="compute dtype")
    parser.add_argument("--batch_size", type=common.positive_int, default=32, help="sequences per step")
    parser.add_argument("--seq_len", type=common.positive_int, default=128, help="tokens per sequence")
    parser.add_argument("--vocab_size", type=common.int_in(6), default=30522, help="vocabulary size (both sides)")
    parser.add_argument("--mask_rate", type=common.float_in(0, 1, open_low=True, open_high=True), default=0.15,
                        help="fraction of positions to predict")
    parser.add_argument("--steps", type=common.positive_int, default=3, help="steps per timing round")
    parser.add_argument("--rounds", type=common.positive_int, default=3, help="timing rounds (the median is reported)")
    parser.add_argument("--peak_size", type=common.positive_int, default=2048, help="matrix size of the peak matmul")
    parser.add_argument("--peak_tflops", type=common.positive_float, default=None,
                        help="also report MFU against this datasheet peak (TFLOP/s), e.g. for a GPU")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=None,
                        help="compare with transformers BertForMaskedLM (default: on when JAX runs on CPU)")
    parser.add_argument("--hf_dropout", default="0.1,0.0", help="comma-separated dropout rates for transformers")
    parser.add_argument("--malloc_tuning", action=argparse.BooleanOptionalAction, default=True,
                        help="keep freed memory in the process (glibc mallopt, as train.py does) so that steps do "
                             "not page-fault their temporaries afresh; applies to both sides of the comparison")
    parser.add_argument("--sweep", action="store_true",
                        help="also time microbatch sizes 8..64 and 1/2/4 accumulation steps (ours only)")
    parser.add_argument("--separate", type=common.non_negative_int, default=0, metavar="ROUNDS",
                        help="time each framework alone in its own process (ours, then transformers at each "
                             "--hf_dropout), this many alternating rounds; ratios are medians of per-round ratios")
    parser.add_argument("--alone", choices=["ours", "transformers"], help=argparse.SUPPRESS)  # --separate's child
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="only profile our step (jax.profiler, --steps steps): time by kind of XLA op and the "
                             "N costliest ops; no timing rounds")
    return parser


def compare(args, cfg, hf_dropouts: list[float], peak_runner, peak_flop: float) -> None:
    """Ours against transformers (one runner per dropout rate), interleaved: the table of tokens/s, MFU, ratios."""
    B, T = args.batch_size, args.seq_len
    flops = model.flops_per_token(cfg, T, args.mask_rate)
    runners = {"peak": peak_runner, "ours": OurRunner(cfg, B, T, args.mask_rate).run}
    if hf_dropouts:
        import torch
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{torch.get_num_threads()} threads"
        print(f"transformers: torch {torch.__version__} on {where}")
        for dropout in hf_dropouts:
            hf = HFRunner(cfg, B, T, args.mask_rate, dropout, args.precision)
            runners[f"transformers dropout {dropout}"] = hf.run
        print(f"transformers attention implementation: {hf.attention}")
    cpu = {}
    times = interleaved(runners, args.steps, args.rounds, cpu)
    peaks = peak_flop / times.pop("peak")  # FLOP/s in each round
    dtype = jnp.dtype(model.PRECISIONS[args.precision]).name
    print(f"peak: jit(a @ b), {args.peak_size}x{args.peak_size} {dtype}: median {np.median(peaks) / 1e9:.1f} "
          f"GFLOP/s (rounds: {', '.join(f'{p / 1e9:.0f}' for p in peaks)})")

    print(f"\n| {'run':<26} | {'tokens/s':>9} | {'MFU':>5} | {'ours / this':>11} |")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 7}|{'-' * 13}|")
    for name, t in times.items():
        rate = B * T / np.median(t)
        mfu = np.median(flops * B * T / t / peaks)  # per round, against that round's peak
        ratio = np.median(t / times["ours"])
        print(f"| {name:<26} | {rate:9.0f} | {mfu:5.2f} | {ratio:10.2f}x |")
    print("(medians over rounds; MFU counts our model FLOPs for every row, though transformers also decodes "
          "the unmasked positions)")
    # The same ratio in process CPU time: a busy machine that takes cores away from us slows a long chain of
    # small parallel ops (the step) more than one big matmul; CPU time does not count the time taken away.
    cpu_mfu = np.median((flops * B * T / np.array(cpu["ours"])) / (peak_flop / np.array(cpu["peak"])))
    print(f"MFU of ours in CPU time (FLOPs per CPU-second, step vs peak matmul): {cpu_mfu:.2f}; "
          f"CPU-seconds per wall-second: step {np.median(np.array(cpu['ours']) / times['ours']):.2f}, "
          f"peak matmul {np.median(np.array(cpu['peak']) * peaks / peak_flop):.2f}")
    if args.peak_tflops:
        ours = B * T / np.median(times["ours"])
        print(f"MFU against the datasheet peak {args.peak_tflops} TFLOP/s: "
              f"{flops * ours / (args.peak_tflops * 1e12):.3f}")


def sweep(args, cfg, peak_runner, peak_flop: float) -> None:
    """Ours at microbatch sizes 8..64 (about the same tokens per round), then 1, 2, 4 accumulation steps."""
    B, T = args.batch_size, args.seq_len
    flops = model.flops_per_token(cfg, T, args.mask_rate)
    print(f"\nmicrobatch size (ours, seq {T}, about {args.steps * B * T} tokens per round):")
    sizes = (8, 16, 32, 64)
    runners = {b: OurRunner(cfg, b, T, args.mask_rate) for b in sizes}
    # Every size runs about the same number of tokens per round (sizes below the batch take more steps).
    sweep_runners = {b: (lambda r, n: lambda steps: r.run(n * steps) / n)(runners[b], max(1, B // b)) for b in sizes}
    sweep_times = interleaved({"peak": peak_runner, **sweep_runners}, args.steps, args.rounds)
    sweep_peaks = peak_flop / sweep_times.pop("peak")
    print(f"| {'batch':>5} | {'tokens/s':>9} | {'MFU':>5} |")
    print(f"|{'-' * 7}|{'-' * 11}|{'-' * 7}|")
    for b, t in sweep_times.items():
        mfu = np.median(flops * b * T / t / sweep_peaks)
        print(f"| {b:>5} | {b * T / np.median(t):9.0f} | {mfu:5.2f} |")

    print(f"\ngradient accumulation (ours, total batch {B}, lax.scan inside the one jitted step):")
    accum = {a: OurRunner(cfg, B, T, args.mask_rate, accum_steps=a).run for a in (1, 2, 4) if B % a == 0}
    accum_times = interleaved(accum, args.steps, args.rounds)
    print(f"| {'steps':>5} | {'microbatch':>10} | {'tokens/s':>9} | {'vs 1 step':>9} |")
    print(f"|{'-' * 7}|{'-' * 12}|{'-' * 11}|{'-' * 11}|")
    for a, t in accum_times.items():
        print(f"| {a:>5} | {B // a:>10} | {B * T / np.median(t):9.0f} | {np.median(accum_times[1] / t):9.2f} |")


def alone(args, cfg, hf_dropouts: list[float]) -> None:
    """--separate's child: one framework in this process; prints its tokens/s (median of --rounds) as JSON."""
    B, T = args.batch_size, args.seq_len
    if args.alone == "ours":
        runners = {"ours": OurRunner(cfg, B, T, args.mask_rate).run}
    else:
        runners = {f"transformers dropout {d}": HFRunner(cfg, B, T, args.mask_rate, d, args.precision).run
                   for d in hf_dropouts}
    times = interleaved(runners, args.steps, args.rounds)
    print("RESULT " + json.dumps({name: B * T / float(np.median(t)) for name, t in times.items()}))


def separate(args, cfg) -> None:
    """Ours and transformers each alone in a fresh process, --separate alternating rounds: ours first in even
    rounds, transformers first in odd ones; the table of per-round tokens/s and the medians of per-round ratios."""
    argv = sys.argv[1:]
    for i, a in enumerate(argv):  # the same flags, less --separate N (or --separate=N)
        if a.startswith("--separate"):
            argv = argv[:i] + argv[i + (1 if "=" in a else 2):]
            break
    child = [sys.executable, os.path.abspath(__file__), *argv]
    rounds = []
    for r in range(args.separate):
        order = ["ours", "transformers"] if r % 2 == 0 else ["transformers", "ours"]
        rates = {}
        for side in order:
            proc = subprocess.run([*child, "--alone", side], capture_output=True, text=True)
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not found:
                raise SystemExit(f"error: the {side} process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            rates.update(json.loads(found[-1][len("RESULT "):]))
        load = os.getloadavg()[0]
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + f" tokens/s; load {load:.2f}",
              flush=True)
        rounds.append(rates)
    names = list(rounds[0])
    print(f"\n| {'run (own process)':<26} | {'tokens/s':>9} | {'ours / this':>11} | per-round ratios")
    print(f"|{'-' * 28}|{'-' * 11}|{'-' * 13}|{'-' * 17}")
    for name in ["ours", *[n for n in names if n != "ours"]]:
        rate = np.median([r[name] for r in rounds])
        ratios = [r["ours"] / r[name] for r in rounds]
        print(f"| {name:<26} | {rate:9.0f} | {np.median(ratios):10.2f}x | "
              + ", ".join(f"{x:.2f}" for x in ratios))
    print(f"(medians over {len(rounds)} rounds of separate processes; tokens/s per process: median of its "
          f"{args.rounds} timing rounds of {args.steps} steps)")


def profile(args, cfg) -> None:
    """jax.profiler trace of our step: where a step's time goes, as XLA:CPU's own per-op (thunk) timings.

    Ops are summed over every thread (a thread pool runs several at once), by op and by kind (the name without its
    number: fusion, ynn_fusion for matmuls, ...); "host" is the Python side of a step (train_step's dispatch)."""
    runner = OurRunner(cfg, args.batch_size, args.seq_len, args.mask_rate)
    runner.run(args.steps)  # warm
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            seconds = runner.run(args.steps)
        trace = jax.profiler.ProfileData.from_file(glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0])
    ops, kinds, host = collections.Counter(), collections.Counter(), 0.0
    skip = ("ThreadpoolListener", "ThunkExecutor", "end: ", "SlinkyThreadPool", "$")
    for plane in trace.planes:
        for line in plane.lines:
            for event in line.events:
                if line.name == "python":
                    host += event.duration_ns * 1e-9 if event.name.startswith("PjitFunction(train_step") else 0.0
                elif not event.name.startswith(skip):
                    ops[event.name] += event.duration_ns * 1e-9
                    kinds[re.sub(r"[.\d]+$", "", event.name)] += event.duration_ns * 1e-9
    # What each op computes: the jax operation it came from (its op_name in the compiled HLO's metadata).
    hlo = runner.step.lower(runner.state, runner.tokens, np.int32(0), runner.lr, runner.key,
                            accum_steps=1).compile().as_text()
    origin = dict(re.findall(r"%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo))
    n = args.steps
    print(f"\nprofile of ours, {n} steps: {seconds / n * 1e3:.1f} ms per step (wall, traced); ops summed over "
          f"threads {sum(ops.values()) / n * 1e3:.1f} ms; host dispatch {host / n * 1e3:.1f} ms")
    inside = sum(t for name, t in ops.items() if "while/body" in origin.get(name, ""))
    print(f"forward and backward (inside the accumulation scan) {inside / n * 1e3:.1f} ms; the rest (masking, "
          f"all-reduce, clipping, AdamW, metrics) {(sum(ops.values()) - inside) / n * 1e3:.1f} ms per step")
    print(f"| {'kind of op':<40} | {'ms/step':>8} | {'share':>6} |")
    for name, t in kinds.most_common(12):
        print(f"| {name:<40} | {t / n * 1e3:8.2f} | {t / sum(ops.values()):6.1%} |")
    print(f"| {'op':<28} | {'ms/step':>8} | {'share':>6} | from")
    for name, t in ops.most_common(args.profile):
        where = re.sub(r"^jit\(train_step\)/|while/body/|closed_call/", "", origin.get(name, ""))
        print(f"| {name[:28]:<28} | {t / n * 1e3:8.2f} | {t / sum(ops.values()):6.1%} | {where}")


def main():
    args = build_parser().parse_args()
    try:
        hf_dropouts = [float(d) for d in args.hf_dropout.split(",") if d.strip()]
    except ValueError:
        raise common.UserError(f"--hf_dropout must be comma-separated numbers, got {args.hf_dropout!r}") from None
    if args.separate:  # the children do the work
        return separate(args, model.make_config(args.model, args.vocab_size))
    if not (args.hf if args.hf is not None else jax.default_backend() == "cpu"):
        hf_dropouts = []
    malloc_tuned = args.malloc_tuning and train.keep_freed_memory()  # before JAX and torch start their threads

    model.set_precision(args.precision)
    cfg = model.make_config(args.model, args.vocab_size)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: {args.model} L{cfg.num_layers}/H{cfg.hidden_size}/heads{cfg.num_heads}/I{cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}, seq {args.seq_len}, batch {args.batch_size}, mask rate {args.mask_rate}, "
          f"precision {args.precision}")
    print(f"model FLOPs per token: {model.flops_per_token(cfg, args.seq_len, args.mask_rate) / 1e6:.1f} M "
          "(flops_per_token)")
    print(f"malloc tuning (keep freed memory): {'on' if malloc_tuned else 'off'}")
    if args.profile:
        return profile(args, cfg)
    if args.alone:
        return alone(args, cfg, hf_dropouts)
    peak_repeats = 5
    peak_runner = model.matmul_timer(args.peak_size, model.PRECISIONS[args.precision], peak_repeats)
    peak_flop = 2 * args.peak_size**3 * peak_repeats  # per step of the peak runner
    compare(args, cfg, hf_dropouts, peak_runner, peak_flop)
    if args.sweep:
        sweep(args, cfg, peak_runner, peak_flop)


if __name__ == "__main__":
    common.run_main(main)
