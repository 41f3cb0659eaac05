"""Benchmark (not a test): wall time of one SST-2 finetuning epoch, finetune.py (JAX) against Hugging Face
transformers (PyTorch BertForSequenceClassification in a plain training loop), side by side in one run.

    python bench_finetune.py --tokenizer tokenizer.json --glue_dir /path/to/glue           # the full epoch
    python bench_finetune.py --tokenizer tokenizer.json --glue_dir ... --max_examples 4000  # a fixed prefix
    python bench_finetune.py --init_hf BERT_DIR --glue_dir ... --dev   # both from a Hugging Face BERT; dev accuracy

Both sides train the same model shape (mini: 4 layers, hidden 256, 4 heads, MLP 1024, random init), in fp32, on
the same token ids (the tokenizer and pair encoding of finetune.py), batch 32, max length 128, AdamW with warmup
and linear decay, gradient clipping at 1.0 and the same dropout. finetune.py runs its own epoch code: batches
bucketed by length, padded to a multiple of --pad_multiple. The baseline gets dynamic padding (each random batch
padded to its longest member, as transformers' DataCollatorWithPadding does), which is the fair, usual setup.
The two sides alternate in segments of --segment steps so that load from other processes hits both alike.
The JAX time includes compiling the step for each batch length on its first use, as in finetune.py (reported).
With --init_hf both sides start from the same Hugging Face BERT folder (ours through hf.load_hf, transformers
through from_pretrained; the same new classifier weights on both sides) and see the same tokens (the converted
tokenizer's ids mapped back to the folder's own ids for transformers); --dev scores both on the dev set after the
last epoch.

Extras needed only here: pip install torch transformers
"""
import dataclasses
import functools
import os
import time

import jax
import jmp
import numpy as np

import common
import finetune as ft
import glue
import hf as hf_io
import model as bert

WARMUP, WEIGHT_DECAY = 0.1, 0.01  # both sides, as finetune.py's defaults


def hf_model(cfg, num_labels: int, dropout: float, seed: int, init_hf: str | None, classifier: dict):
    import torch
    import transformers

    torch.manual_seed(seed)
    if init_hf:
        net = transformers.BertForSequenceClassification.from_pretrained(
            init_hf, num_labels=num_labels, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
            ignore_mismatched_sizes=True)  # a classifier of another size is replaced below
        with torch.no_grad():  # the same new head as ours
            net.classifier.weight.copy_(torch.from_numpy(np.array(classifier["w"]).T))
            net.classifier.bias.copy_(torch.from_numpy(np.array(classifier["b"])))
        return net
    hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                                     intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_position,
                                     type_vocab_size=cfg.type_vocab_size, hidden_dropout_prob=dropout,
                                     attention_probs_dropout_prob=dropout, num_labels=num_labels)
    return transformers.BertForSequenceClassification(hf_cfg)


def hf_batch(enc: ft.Encoded, idx: np.ndarray, id_map: np.ndarray | None):
    """Rows idx padded to their longest (dynamic padding): torch (ids, token types, attention mask)."""
    import torch

    T = int(enc.lengths[idx].max())
    ids = enc.ids[idx, :T] if id_map is None else id_map[enc.ids[idx, :T]]
    mask = (np.arange(T)[None] < enc.lengths[idx][:, None]).astype(np.int64)
    return (torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(enc.types[idx, :T].astype(np.int64)),
            torch.from_numpy(mask))


def hf_trainer(net, enc: ft.Encoded, labels: np.ndarray, batches: list, *, lr: float, warmup: float,
               weight_decay: float, total_steps: int, id_map):
    """A generator: each next() trains the next batch of row indices, padded to its longest row; yields the loss
    and the real and padded token counts."""
    import torch
    import transformers

    decay = [p for n, p in net.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in net.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, eps=1e-6)
    sched = transformers.get_linear_schedule_with_warmup(opt, round(warmup * total_steps), total_steps)
    net.train()
    for idx in batches:
        ids, types, mask = hf_batch(enc, idx, id_map)
        out = net(input_ids=ids, token_type_ids=types, attention_mask=mask,
                  labels=torch.from_numpy(labels[idx].astype(np.int64)))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        yield float(out.loss.detach()), int(enc.lengths[idx].sum()), ids.numel()


def build_parser() -> common.ArgumentParser:
    p = common.ArgumentParser(__doc__)
    p.add_argument("--tokenizer",
                   help="tokenizer.json for a random-init model (e.g. python tokenizer.py --vocab_size 30522)")
    p.add_argument("--init_hf", metavar="DIR", help="start both sides from this Hugging Face BERT folder")
    p.add_argument("--epochs", type=common.positive_int, default=1, help="epochs (default: 1)")
    p.add_argument("--seed", type=common.seed, default=0,
                   help="seeds the new head (the same on both sides), batch order and dropout (default: 0)")
    p.add_argument("--dev", action="store_true", help="score both sides on the SST-2 dev set at the end")
    p.add_argument("--same_batches", action="store_true",
                   help="transformers trains on finetune.py's length-bucketed batches in the same order (default: "
                        "a random order with dynamic padding, the usual way); isolates the implementations")
    p.add_argument("--glue_dir", required=True, help="GLUE folder holding SST-2/train.tsv")
    p.add_argument("--max_examples", type=common.non_negative_int, default=0,
                   help="use the first N training rows (default: 0 = all)")
    p.add_argument("--model", default="mini", choices=list(bert.PRESETS), help="model preset (default: mini)")
    p.add_argument("--batch_size", type=common.positive_int, default=32, help="batch size (default: 32)")
    p.add_argument("--max_len", type=common.int_in(8), default=128, help="max tokens per example (default: 128)")
    p.add_argument("--pad_multiple", type=common.positive_int, default=8,
                   help="finetune.py's --pad_multiple (default: 8)")
    p.add_argument("--dropout", type=common.float_in(0, 1, open_high=True), default=0.1,
                   help="dropout on both sides (default: 0.1)")
    p.add_argument("--lr", type=common.positive_float, default=3e-5, help="peak learning rate (default: 3e-5)")
    p.add_argument("--segment", type=common.positive_int, default=100,
                   help="steps per alternating segment (default: 100)")
    p.add_argument("--skip_hf", action="store_true", help="time finetune.py only")
    return p


def load(args):
    """-> (model config, pretrained params or None, tokenizer, id_map or None): from --init_hf or --tokenizer."""
    if bool(args.tokenizer) == bool(args.init_hf):
        raise common.UserError("give --tokenizer (random init) or --init_hf DIR")
    if args.epochs < 1:
        raise common.UserError("--epochs must be positive")
    if not args.init_hf:
        tok = common.load_tokenizer(args.tokenizer)
        return bert.make_config(args.model, tok.get_vocab_size(), dropout=args.dropout), None, tok, None
    from tokenizers import Tokenizer
    cfg, pretrained, tokenizer_bytes, info = hf_io.load_hf(args.init_hf)
    pretrained.pop("classifier", None)  # a new head for the task, as finetune.py does
    tok, id_map = Tokenizer.from_str(tokenizer_bytes.decode("utf-8")), np.asarray(info["old_id"])
    return dataclasses.replace(cfg, dropout=args.dropout), pretrained, tok, id_map


class CompileTimer:
    """finetune.py's step; the first call per batch length compiles it, which is timed, to report."""

    def __init__(self, step_fn):
        self.step_fn, self.lengths, self.seconds = step_fn, set(), 0.0

    def __call__(self, *a):
        T = a[3].shape[1]
        if T in self.lengths:
            return self.step_fn(*a)
        self.lengths.add(T)
        start = time.perf_counter()
        out = jax.block_until_ready(self.step_fn(*a))
        self.seconds += time.perf_counter() - start
        return out


def alternate(timed_step: CompileTimer, state, enc: ft.Encoded, labels, batches: list, hf, args, key, lr_fn):
    """Train both sides in turns of --segment steps; print their times. -> finetune.py's final state."""
    steps, n = len(batches), len(labels)
    jax_time = hf_time = 0.0
    jax_losses, hf_losses, hf_real, hf_padded, step = [], [], 0, 0, 0
    for seg in range(0, steps, args.segment):
        start = time.perf_counter()
        state, step, loss = ft.train_epoch(timed_step, state, enc, labels, batches[seg:seg + args.segment],
                                           batch_size=args.batch_size, multiple=args.pad_multiple, key=key,
                                           step=step, lr_fn=lr_fn, desc="finetune.py")
        jax.block_until_ready(state)
        jax_time += time.perf_counter() - start
        jax_losses.append(loss)
        if hf is not None:
            start = time.perf_counter()
            for _, (loss, real, padded) in zip(range(args.segment), hf):
                hf_losses.append(loss)
                hf_real, hf_padded = hf_real + real, hf_padded + padded
            hf_time += time.perf_counter() - start
        hf_note = f", transformers {hf_time:.1f} s" if hf else ""
        print(f"  step {step}/{steps}: finetune.py {jax_time:.1f} s{hf_note}", flush=True)

    jax_real = int(enc.lengths.sum())
    jax_padded = sum(args.batch_size * ft.padded_length(enc.lengths[b].max(), args.pad_multiple, args.max_len)
                     for b in batches)
    print(f"\nfinetune.py (JAX): {jax_time:.1f} s, of which about {timed_step.seconds:.1f} s compiling "
          f"{len(timed_step.lengths)} batch shapes; {n / jax_time:.0f} examples/s; padding efficiency "
          f"{jax_real / jax_padded:.2f}; mean loss first/last segment {jax_losses[0]:.3f}/{jax_losses[-1]:.3f}")
    if hf is not None:
        seg_loss = [np.mean(hf_losses[i:i + args.segment]) for i in range(0, len(hf_losses), args.segment)]
        print(f"transformers (PyTorch, dynamic padding): {hf_time:.1f} s; {n / hf_time:.0f} examples/s; padding "
              f"efficiency {hf_real / hf_padded:.2f}; mean loss first/last segment "
              f"{seg_loss[0]:.3f}/{seg_loss[-1]:.3f}")
        print(f"speedup: {hf_time / jax_time:.2f}x (training wall time, JAX compilation included), "
              f"{hf_time / (jax_time - timed_step.seconds):.2f}x (compilation excluded)")
    return state


def hf_dev_accuracy(hf_net, dev_enc: ft.Encoded, dev_labels: np.ndarray, id_map) -> float:
    import torch

    hf_net.eval()
    with torch.no_grad():
        logits = [hf_net(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.numpy()
                  for idx in np.array_split(np.arange(len(dev_labels)), 16)
                  for ids, types, mask in [hf_batch(dev_enc, idx, id_map)]]
    return float(np.mean(np.concatenate(logits).argmax(-1) == dev_labels))


def main() -> None:
    args = build_parser().parse_args()
    import torch

    cfg, pretrained, tok, id_map = load(args)
    tok = ft.prepare_tokenizer(tok, args.max_len)
    task = glue.TASKS["sst2"]
    examples = glue.read_glue_file(task, os.path.join(args.glue_dir, task.train.file), True)
    if args.max_examples:
        examples = examples.head(args.max_examples)
    enc, labels = ft.encode(tok, examples, args.max_len), examples.labels
    n = len(labels)
    steps = -(-n // args.batch_size) * args.epochs

    # finetune.py: its train step, batches and epoch loop
    bert.set_precision("fp32")
    step_fn, logits_fn, optimizer = ft.compiled_fns(cfg, task.num_labels, False, WEIGHT_DECAY, "fp32")
    lr_fn = functools.partial(ft.finetune_lr, lr=args.lr, total_steps=steps, warmup_steps=round(WARMUP * steps))
    params, _ = ft.init_params(cfg, task.num_labels, pretrained, jax.random.PRNGKey(args.seed))
    state = (params, optimizer.init(params), jmp.NoOpLossScale())
    batch_rng = np.random.default_rng(args.seed)
    batches = [b for _ in range(args.epochs) for b in ft.make_batches(enc.lengths, args.batch_size, batch_rng)]
    timed_step = CompileTimer(step_fn)

    hf = None
    if not args.skip_hf:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
        hf_net = hf_model(cfg, task.num_labels, args.dropout, args.seed, args.init_hf, params["classifier"])
        if args.same_batches:
            hf_batches = batches
        else:  # the usual way: a random order each epoch
            orders = [np.random.default_rng(1000 * args.seed + epoch).permutation(n) for epoch in range(args.epochs)]
            hf_batches = [order[i:i + args.batch_size] for order in orders for i in range(0, n, args.batch_size)]
        hf = hf_trainer(hf_net, enc, labels, hf_batches, lr=args.lr, warmup=WARMUP, weight_decay=WEIGHT_DECAY,
                        total_steps=steps, id_map=id_map)
    print(f"{n} examples x {args.epochs} epochs, {steps} steps of {args.batch_size}; {args.init_hf or args.model} "
          f"{cfg.num_layers}L/{cfg.hidden_size}H, vocab {cfg.vocab_size}; JAX {jax.default_backend()}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); segments of {args.segment} steps", flush=True)
    key = jax.random.PRNGKey(args.seed + 1)
    state = alternate(timed_step, state, enc, labels, batches, hf, args, key, lr_fn)
    if args.dev:
        dev = glue.read_glue_file(task, os.path.join(args.glue_dir, task.dev[0].file), True)
        dev_enc = ft.encode(tok, dev, args.max_len)
        logits = ft.predict(logits_fn, state[0], dev_enc, 128, args.pad_multiple)
        print(f"dev accuracy ({len(dev.labels)} rows): finetune.py {np.mean(logits.argmax(-1) == dev.labels):.4f}",
              flush=True)
        if hf is not None:
            print(f"dev accuracy: transformers {hf_dev_accuracy(hf_net, dev_enc, dev.labels, id_map):.4f}")


if __name__ == "__main__":
    common.run_main(main)
