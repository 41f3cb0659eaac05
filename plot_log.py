"""Plot and tabulate a train.py run from its tensorboard log: loss.png, log.md and log.json.

    python plot_log.py out                          # writes out/loss.png, out/log.md, out/log.json
    python plot_log.py out --out results/mini_1h    # somewhere to commit them

Reads the event files train.py writes in OUT_DIR/tb/ directly (their TFRecord framing, and tensorboardX's own
protobuf classes): no tensorboard package. The x axis is tokens seen, the step of every scalar train.py logs.
A run resumed into the same out_dir adds an event file; from its first step on it replaces what the earlier
files logged, so that points logged after the checkpoint it resumed from do not linger (as TensorBoard's purge).

loss.png: train and validation MLM loss, learning rate and batch size against tokens. log.md and log.json: one
row per evaluation: tokens, the mean train loss and tokens/s logged since the previous evaluation, val loss.
The plot needs matplotlib (pip install matplotlib); the tables do not.
"""
import io
import math
import os
import struct

import common
from common import UserError

# Every scalar train.py logs, by the name it logs it under; the x axis is tokens seen.
TAGS = dict(loss="train/loss", accuracy="train/accuracy", lr="train/lr", batch_size="train/batch_size",
            grad_norm="train/grad_norm", loss_scale="train/loss_scale", step="train/step",
            skipped_steps="train/skipped_steps", tokens_per_s="perf/tokens_per_s", mfu="perf/mfu",
            eval_loss="eval/loss", eval_accuracy="eval/accuracy")
COLUMNS = [("tokens", "tokens"), ("train_loss", "train loss"), ("val_loss", "val loss"),
           ("tokens_per_s", "tokens/s")]


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(__doc__)
    p.add_argument("out_dir", metavar="OUT_DIR", help="a train.py --out_dir (its tb/ folder is read), or a tb/ "
                                                       "folder itself")
    p.add_argument("--out", help="write loss.png, log.md and log.json into this folder, made if needed "
                                 "(default: OUT_DIR)")
    p.add_argument("--no_plot", action="store_true", help="write only log.md and log.json (no matplotlib needed)")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Reading event files

def read_records(path: str) -> list[bytes]:
    """The records of one TFRecord file: uint64 length, uint32 masked crc32c of those 8 bytes, the data, uint32
    masked crc32c of the data, all little-endian. A truncated last record (a writer killed mid-write) ends it."""
    from tensorboardX.record_writer import masked_crc32c

    with open(path, "rb") as f:
        buf = f.read()
    records, at = [], 0
    while at + 12 <= len(buf):
        length, header_crc = struct.unpack_from("<QI", buf, at)
        if header_crc != masked_crc32c(buf[at:at + 8]):
            raise UserError(f"{path}: corrupt record header at byte {at} (not a tensorboard event file?)")
        end = at + 12 + length + 4
        if end > len(buf):
            break
        data = buf[at + 12:end - 4]
        if struct.unpack_from("<I", buf, end - 4)[0] != masked_crc32c(data):
            raise UserError(f"{path}: corrupt record at byte {at}")
        records.append(data)
        at = end
    return records


def scalar_value(value) -> float | None:
    """A Summary.Value's number: simple_value (tensorboardX's add_scalar), or a one-element float/double tensor
    (its new_style scalars); None for anything else (histograms, images, ...)."""
    kind = value.WhichOneof("value")
    if kind == "simple_value":
        return float(value.simple_value)
    if kind == "tensor":
        numbers = list(value.tensor.float_val) or list(value.tensor.double_val)
        if len(numbers) == 1:
            return float(numbers[0])
    return None


def read_event_file(path: str) -> tuple[float, dict[str, list[tuple[int, float]]]]:
    """One event file -> (wall time of its first event, {tag: [(step, value), ...] in the order written})."""
    from tensorboardX.proto import event_pb2

    first_time, scalars = math.inf, {}
    for record in read_records(path):
        try:
            event = event_pb2.Event.FromString(record)
        except Exception:
            raise UserError(f"{path}: a record is not a tensorboard event") from None
        first_time = min(first_time, event.wall_time)
        for value in event.summary.value:
            number = scalar_value(value)
            if number is not None:
                scalars.setdefault(value.tag, []).append((int(event.step), number))
    return first_time, scalars


def merge_runs(files: list[dict[str, list[tuple[int, float]]]]) -> dict[str, dict[int, float]]:
    """Event files' scalars in the order written -> {tag: {step: value}} sorted by step. A later file replaces
    everything earlier files logged from its first step on; a later value for the same step replaces an earlier."""
    merged: dict[str, dict[int, float]] = {}
    for scalars in files:
        steps = [step for points in scalars.values() for step, _ in points]
        if steps:
            first = min(steps)
            merged = {tag: {s: v for s, v in series.items() if s < first} for tag, series in merged.items()}
        for tag, points in scalars.items():
            merged.setdefault(tag, {}).update(points)
    return {tag: dict(sorted(series.items())) for tag, series in merged.items()}


def read_log(out_dir: str) -> dict[str, dict[int, float]]:
    """{tag: {tokens: value}} from the event files of a train.py out_dir (or of a tb/ folder)."""
    folder = os.path.join(out_dir, "tb") if os.path.isdir(os.path.join(out_dir, "tb")) else out_dir
    names = sorted(n for n in os.listdir(folder) if "tfevents" in n) if os.path.isdir(folder) else []
    if not names:
        raise UserError(f"no tensorboard event files in {folder} (expected a train.py --out_dir with a tb/ folder)")
    for name in names:
        if not os.path.isfile(os.path.join(folder, name)):
            raise UserError(f"{os.path.join(folder, name)} is not a file (a tensorboard event file was expected)")
    files = sorted(((*read_event_file(os.path.join(folder, n)), n) for n in names),
                   key=lambda f: (f[0], f[2]))  # in the order written: first wall time, then name
    scalars = merge_runs([scalars for _, scalars, _ in files])
    if not scalars.get(TAGS["loss"]):
        raise UserError(f"{folder} holds no {TAGS['loss']} scalars: not a train.py log")
    return scalars


# ----------------------------------------------------------------------------------------------------------------
# Tables

def mean_between(series: dict[int, float], after: int, upto: int) -> float | None:
    """Mean of the finite values at steps in (after, upto]; None if there are none."""
    values = [v for s, v in series.items() if after < s <= upto and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def eval_rows(scalars: dict[str, dict[int, float]]) -> list[dict]:
    """One row per evaluation: tokens, val loss, and the means of the train losses and tokens/s logged since the
    previous evaluation (None where nothing finite was logged)."""
    train, speed = scalars.get(TAGS["loss"], {}), scalars.get(TAGS["tokens_per_s"], {})
    rows, previous = [], -1
    for tokens, val_loss in scalars.get(TAGS["eval_loss"], {}).items():
        rows.append(dict(tokens=tokens, train_loss=mean_between(train, previous, tokens),
                         val_loss=val_loss if math.isfinite(val_loss) else None,
                         tokens_per_s=mean_between(speed, previous, tokens)))
        previous = tokens
    return rows


def format_count(n: float) -> str:
    """571.1 -> 571, 1234 -> 1.2k, 12_345_678 -> 12.35M, 3e9 -> 3.00B."""
    for scale, suffix, digits in ((1e9, "B", 2), (1e6, "M", 2), (1e3, "k", 1)):
        if abs(n) >= scale:
            return f"{n / scale:.{digits}f}{suffix}"
    return f"{n:.0f}"


def markdown_table(rows: list[dict]) -> str:
    def cell(key, value):
        if value is None:
            return "-"
        return format_count(value) if key in ("tokens", "tokens_per_s") else f"{value:.4f}"

    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(key, row[key]) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Plot

def plot(scalars: dict[str, dict[int, float]], path: str) -> None:
    """loss.png: train and val loss, learning rate and batch size against tokens, one panel each."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter
    except ImportError:
        raise UserError("loss.png needs matplotlib: pip install matplotlib (or pass --no_plot)") from None
    fig = Figure(figsize=(8, 9), layout="constrained")
    loss_ax, lr_ax, batch_ax = fig.subplots(3, 1, sharex=True, gridspec_kw=dict(height_ratios=[2, 1, 1]))

    def line(ax, tag, **style):
        series = scalars.get(tag, {})
        ax.plot(list(series), list(series.values()), **style)

    line(loss_ax, TAGS["loss"], lw=0.8, alpha=0.6, label="train")
    line(loss_ax, TAGS["eval_loss"], marker="o", ms=4, label="validation")
    loss_ax.set(ylabel="MLM loss")
    loss_ax.legend()
    line(lr_ax, TAGS["lr"])
    lr_ax.set(ylabel="learning rate")
    line(batch_ax, TAGS["batch_size"], drawstyle="steps-post")
    batch_ax.set(ylabel="batch size (sequences)", xlabel="tokens seen")
    batch_ax.xaxis.set_major_formatter(EngFormatter())
    for ax in (loss_ax, lr_ax, batch_ax):
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    common.atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------------------------
# Main

def main(argv: list[str] | None = None) -> list[dict]:
    """Write the outputs; returns the table's rows (for tests and notebooks)."""
    args = build_parser().parse_args(argv)
    out = args.out or args.out_dir
    if args.out and os.path.exists(out) and not os.path.isdir(out):  # at once; a bad OUT_DIR is read_log's to report
        raise UserError(f"--out {out} is a file, not a folder")
    common.check_writable_folder(out)
    scalars = read_log(args.out_dir)
    rows = eval_rows(scalars)
    common.make_folder(out)
    common.atomic_write_bytes(os.path.join(out, "log.md"), markdown_table(rows).encode())
    common.atomic_write_json(os.path.join(out, "log.json"), dict(source=args.out_dir, rows=rows))
    written = ["log.md", "log.json"]
    if not args.no_plot:
        plot(scalars, os.path.join(out, "loss.png"))
        written.append("loss.png")
    last = max(scalars[TAGS["loss"]])
    print(f"{len(rows)} evaluations, {format_count(last)} tokens; wrote {', '.join(written)} in {out}")
    return rows


if __name__ == "__main__":
    common.run_main(main)
