"""Does a checkpoint use word order? The MLM loss on validation windows as they are, with each window's context
shuffled (every token keeps its masked or unmasked state and the masked ones their targets), and with no context
at all; plus the embedding tables' scale, which sets how far finetuning's Adam steps move them.

    python plateau_probe.py --init out --data_dir data                # a train.py out_dir or ckpt_* folder
    python plateau_probe.py --init out --data_dir data --seq_len 16

A model on the unigram plateau loses nothing when its context is shuffled: it predicts from the bag of words.
"""

import jax
import jax.numpy as jnp
import numpy as np

import checkpoint
import common
import data
import model as bert


def order_losses(params, cfg: bert.BertConfig, windows: np.ndarray, mask_rate: float, seed: int) -> dict:
    """MLM loss on windows [N, T] as they are, context-shuffled, and with every other token [MASK]ed."""
    N, T = windows.shape
    net = bert.mlm_model(cfg)
    inputs, positions, targets, weights = bert.mask_tokens(jax.random.PRNGKey(seed), jnp.asarray(windows),
                                                           mask_rate, cfg.vocab_size)
    loss = jax.jit(lambda x, p: bert.mlm_loss(net.apply(params, None, x, p), targets, weights)[0])
    perm = np.stack([np.random.default_rng([seed, i]).permutation(T) for i in range(N)])  # [N, T]
    where = np.argsort(perm, axis=1)  # where each original position went
    shuffled = jnp.take_along_axis(inputs, jnp.asarray(perm), axis=1)
    moved = jnp.take_along_axis(jnp.asarray(where, jnp.int32), positions, axis=1)  # [N, M]
    alone = jnp.full_like(inputs, common.MASK_ID)
    return dict(loss=float(loss(inputs, positions)), shuffled=float(loss(shuffled, moved)),
                no_context=float(loss(alone, positions)))


def main() -> None:
    p = common.ArgumentParser(__doc__)
    p.add_argument("--init", required=True, help="a train.py out_dir (its newest checkpoint) or a ckpt_* folder")
    p.add_argument("--data_dir", required=True, help="the data.py folder the checkpoint was trained on")
    p.add_argument("--seq_len", type=common.positive_int, default=128, help="validation window length (default: 128)")
    p.add_argument("--windows", type=common.positive_int, default=256,
                   help="validation windows to score (default: 256)")
    p.add_argument("--mask_rate", type=common.float_in(0, 1, open_low=True, open_high=True), default=0.15,
                   help="fraction of positions masked (default: 0.15)")
    p.add_argument("--seed", type=common.seed, default=0, help="picks the windows, masks and shuffles (default: 0)")
    args = p.parse_args()
    params, state = checkpoint.load_checkpoint(args.init)
    cfg = checkpoint.model_config(state)
    windows = data.TokenReader(args.data_dir, "val", args.seq_len, args.seed, state.get("tokenizer_sha256")
                               ).batch(0, args.windows)  # [N, T]
    result = order_losses(params, cfg, windows, args.mask_rate, args.seed)
    print(f"{state['path']}: val loss {result['loss']:.4f} | context shuffled {result['shuffled']:.4f} | "
          f"no context {result['no_context']:.4f}  ({args.windows} windows of {args.seq_len})")
    for name in ("word", "position", "token_type"):
        table = params[f"bert/embeddings/{name}"]["embeddings"]
        rows = table[:args.seq_len] if name == "position" else table
        print(f"{name} embeddings: rms {np.sqrt(np.mean(rows ** 2)):.4f} (BERT's init: 0.0176)")


if __name__ == "__main__":
    common.run_main(main)
