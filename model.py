"""BERT in Haiku: the encoder (pre-LN, or BERT's original post-LN), an MLM head that decodes only the masked
positions, a [CLS] classifier head, and the MLM objective (masking, loss) as pure functions; the FLOPs that MFU
counts, and the AdamW that train.py and finetune.py both train with.

Parameters are float32 pytrees; set_precision() picks the compute dtype. Parameter names follow BERT's
structure ("bert/embeddings/word", "bert/layer_0/attention/output", ...) so that checkpoints can be mapped;
the one difference: "attention/qkv" holds BERT's query, key and value matrices side by side ([H, 3H]).
"""
import math
import time
from dataclasses import dataclass
from typing import Callable

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import optax

from common import MASK_ID, SPECIAL_TOKENS, UserError

NUM_SPECIAL = len(SPECIAL_TOKENS)  # ids below this are special: never masked, never drawn as random tokens

PRESETS = {
    "tiny": dict(num_layers=2, hidden_size=128),
    "mini": dict(num_layers=4, hidden_size=256),
    "small": dict(num_layers=4, hidden_size=512),
    "medium": dict(num_layers=8, hidden_size=512),
    "base": dict(num_layers=12, hidden_size=768),
    "large": dict(num_layers=24, hidden_size=1024),
}


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position: int = 512
    type_vocab_size: int = 2
    post_ln: bool = False  # True: BERT's original layout (LayerNorm after each residual add)
    layer_norm_eps: float = 1e-12
    dropout: float = 0.0  # hidden and attention-probability dropout; only when is_training

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "hidden_size", "num_heads", "intermediate_size",
                     "max_position", "type_vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise UserError(f"model config: num_heads={self.num_heads} does not divide "
                            f"hidden_size={self.hidden_size}")
        if self.vocab_size <= NUM_SPECIAL:
            raise UserError(f"model config: vocab_size={self.vocab_size} leaves no non-special tokens")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if not self.layer_norm_eps > 0:
            raise UserError(f"model config: layer_norm_eps must be positive, got {self.layer_norm_eps}")


def make_config(preset: str, vocab_size: int, **overrides) -> BertConfig:
    """A preset's shape; heads default to hidden/64 and the MLP to 4*hidden, computed after overrides."""
    if preset not in PRESETS:
        raise UserError(f"unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    fields = set(BertConfig.__dataclass_fields__) - {"vocab_size"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UserError(f"unknown model config field(s): {', '.join(unknown)}")
    kwargs = {**PRESETS[preset], **overrides}
    hidden = kwargs["hidden_size"]
    kwargs.setdefault("num_heads", max(1, hidden // 64))
    kwargs.setdefault("intermediate_size", 4 * hidden)
    return BertConfig(vocab_size=vocab_size, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Precision. Our own module classes carry the haiku mixed-precision policies, so other haiku code is untouched.

class Dense(hk.Linear):
    """hk.Linear in the model's compute dtype (bf16/fp16 matmuls under set_precision)."""


class LayerNorm(hk.LayerNorm):
    """hk.LayerNorm that always computes in float32 and returns float32."""

    def __init__(self, eps: float, name: str):
        super().__init__(axis=-1, create_scale=True, create_offset=True, eps=eps, name=name)


PRECISIONS = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def set_precision(precision: str) -> jmp.Policy:
    """Install the haiku policies for `precision` and return the model-level policy (params and outputs fp32).

    Call once before tracing. The residual stream stays float32; matmuls (and the GELU between them) run in
    the compute dtype; LayerNorm, softmax, logits and the loss are float32.
    """
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    f32, compute = jnp.float32, PRECISIONS[precision]
    hk.mixed_precision.set_policy(Dense, jmp.Policy(param_dtype=f32, compute_dtype=compute, output_dtype=compute))
    hk.mixed_precision.set_policy(LayerNorm, jmp.Policy(param_dtype=f32, compute_dtype=f32, output_dtype=f32))
    return jmp.Policy(param_dtype=f32, compute_dtype=compute, output_dtype=f32)


def default_precision() -> str:
    """fp32 on CPU (no fast half-precision matmuls there), bf16 on GPU and TPU."""
    return "fp32" if jax.default_backend() == "cpu" else "bf16"


def _compute_dtype():
    policy = hk.mixed_precision.get_policy(Dense)
    return policy.compute_dtype if policy is not None else jnp.float32


# ----------------------------------------------------------------------------------------------------------
# Encoder

_INIT = hk.initializers.TruncatedNormal(stddev=0.02)  # BERT's initializer for every weight matrix


def _dense(size: int, name: str) -> Dense:
    return Dense(size, w_init=_INIT, name=name)


def _dropout(x, rate: float, is_training: bool):
    return hk.dropout(hk.next_rng_key(), rate, x) if is_training and rate > 0 else x


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)  # exact (erf) GELU, as in BERT


def sinusoidal_positions(max_position: int, hidden_size: int, std: float = 0.02):
    """[P, H] sine/cosine table (Vaswani et al.) scaled to standard deviation `std`, an initial value for the
    learned position embeddings: position p+k is a fixed rotation of position p, so attention to a neighbour at a
    fixed offset is a linear map from the start instead of something to learn for every position."""
    position = jnp.arange(max_position, dtype=jnp.float32)[:, None]  # [P, 1]
    frequency = jnp.exp(-math.log(10000.0) * jnp.arange(0, hidden_size, 2, dtype=jnp.float32) / hidden_size)
    angle = position * frequency  # [P, H/2]
    table = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(max_position, -1)[:, :hidden_size]
    return table * (std / jnp.std(table))  # [P, H]


def _embeddings(cfg: BertConfig, tokens, token_types, is_training):
    """Returns the summed embeddings [B, T, H] (float32) and the word embedding table [V, H] for tying."""
    T = tokens.shape[1]
    if T > cfg.max_position:
        raise UserError(f"sequence length {T} exceeds the model's max_position {cfg.max_position}")
    H = cfg.hidden_size
    with hk.name_scope("embeddings"):
        with hk.name_scope("word"):
            word = hk.get_parameter("embeddings", [cfg.vocab_size, H], init=_INIT)
        with hk.name_scope("position"):
            position = hk.get_parameter("embeddings", [cfg.max_position, H], init=_INIT)
        with hk.name_scope("token_type"):
            token_type = hk.get_parameter("embeddings", [cfg.type_vocab_size, H], init=_INIT)
        type_embedded = token_type[0] if token_types is None else jnp.take(token_type, token_types, axis=0)
        x = jnp.take(word, tokens, axis=0) + position[:T] + type_embedded  # [B, T, H]
        # Both layouts normalise the embeddings (BERT; RoBERTa-PreLayerNorm and Cramming for pre-LN), which
        # keeps a pre-LN model exactly the function of transformers' RobertaPreLayerNorm for export.
        x = LayerNorm(cfg.layer_norm_eps, name="layer_norm")(x)
    return _dropout(x, cfg.dropout, is_training), word


def _softmax_attention(q, k, v, mask, dropout_rate: float):
    """Attention written out, head-major: q (already scaled), k, v [B, N, T, D] -> [B, N, T, D]. Used on CPU,
    where it is faster than XLA's jax.nn.dot_product_attention (which works in [B, T, N, D]), for dropout on
    the probabilities, and for fp16 on CPU, where that function requests an F16_F16_F32 dot XLA:CPU rejects."""
    logits = jnp.einsum("bntd,bnsd->bnts", q, k, preferred_element_type=jnp.float32)  # [B, N, T, S]
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = _dropout(jax.nn.softmax(logits, axis=-1), dropout_rate, True).astype(v.dtype)
    return jnp.einsum("bnts,bnsd->bntd", probs, v)


def _attention_implementation(dtype, mask):
    """cuDNN's fused kernel on GPUs that have it (bf16/fp16, no mask); otherwise None, which in this jax means
    XLA's version (fp32, padding masks)."""
    if jax.default_backend() != "gpu" or mask is not None or dtype not in (jnp.bfloat16, jnp.float16):
        return None
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return "cudnn" if float(capability) >= 8.0 else None


def _attention(cfg: BertConfig, x, mask, is_training):
    """Multi-head self-attention; mask [B, 1, 1, T] bool (True = attend) or None."""
    B, T, H = x.shape
    N, D = cfg.num_heads, H // cfg.num_heads
    with hk.name_scope("attention"):
        # One [H, 3H] projection for query, key and value (BERT's three matrices side by side): one larger
        # matmul is faster than three small ones. Scaling q by 1/sqrt(D) is cheaper than scaling the logits.
        qkv = _dense(3 * H, "qkv")(x).reshape(B, T, 3, N, D)
        qkv = qkv * jnp.asarray([1.0 / math.sqrt(D), 1.0, 1.0], qkv.dtype)[:, None, None]  # scale: [3, 1, 1]
        dropout_rate = cfg.dropout if is_training else 0.0
        if dropout_rate > 0 or jax.default_backend() == "cpu":
            q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [B, N, T, D] each
            out = _softmax_attention(q, k, v, mask, dropout_rate).transpose(0, 2, 1, 3)  # [B, T, N, D]
        else:
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, D] each
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=1.0,  # softmax in float32 inside
                                               implementation=_attention_implementation(q.dtype, mask))
        return _dense(H, "output")(out.reshape(B, T, H))


def _mlp(cfg: BertConfig, x):
    with hk.name_scope("mlp"):
        h = _gelu(_dense(cfg.intermediate_size, "intermediate")(x))
        return _dense(cfg.hidden_size, "output")(h)


def _layer(cfg: BertConfig, x, mask, is_training):
    attention_norm = LayerNorm(cfg.layer_norm_eps, name="attention_layer_norm")
    mlp_norm = LayerNorm(cfg.layer_norm_eps, name="mlp_layer_norm")
    if cfg.post_ln:
        x = attention_norm(x + _dropout(_attention(cfg, x, mask, is_training), cfg.dropout, is_training))
        return mlp_norm(x + _dropout(_mlp(cfg, x), cfg.dropout, is_training))
    x = x + _dropout(_attention(cfg, attention_norm(x), mask, is_training), cfg.dropout, is_training)
    return x + _dropout(_mlp(cfg, mlp_norm(x)), cfg.dropout, is_training)


def _encoder(cfg: BertConfig, tokens, token_types, pad_mask, is_training):
    """tokens [B, T] -> hidden states [B, T, H] float32, and the word embedding table [V, H]."""
    x, word = _embeddings(cfg, tokens, token_types, is_training)
    mask = None if pad_mask is None else pad_mask[:, None, None, :].astype(bool)  # [B, 1, 1, T]
    for i in range(cfg.num_layers):
        with hk.name_scope(f"layer_{i}"):
            x = _layer(cfg, x, mask, is_training)
    if not cfg.post_ln:
        x = LayerNorm(cfg.layer_norm_eps, name="final_layer_norm")(x)
    return x, word


# ----------------------------------------------------------------------------------------------------------
# Heads

def _mlm_head(cfg: BertConfig, hidden, positions, word):
    """Decode only the chosen positions: hidden [B, T, H], positions [B, M] -> logits [B, M, V] float32."""
    h = jnp.take_along_axis(hidden, positions[:, :, None], axis=1)  # [B, M, H]
    with hk.name_scope("mlm_head"):
        h = _gelu(_dense(cfg.hidden_size, "transform")(h))
        h = LayerNorm(cfg.layer_norm_eps, name="layer_norm")(h)
        bias = hk.get_parameter("output_bias", [cfg.vocab_size], init=jnp.zeros)
    compute = _compute_dtype()
    logits = jnp.einsum("bmh,vh->bmv", h.astype(compute), word.astype(compute),
                        preferred_element_type=jnp.float32)  # [B, M, V], decoder tied to the embeddings
    return logits + bias


def mlm_model(cfg: BertConfig) -> hk.Transformed:
    """apply(params, rng, tokens [B, T] int32, positions [B, M] int32, is_training=False) -> [B, M, V] f32.

    rng may be None unless is_training with dropout > 0.
    """
    def forward(tokens, positions, is_training: bool = False):
        with hk.name_scope("bert"):
            hidden, word = _encoder(cfg, tokens, None, None, is_training)
        return _mlm_head(cfg, hidden, positions, word)

    return hk.transform(forward)


POOLINGS = ("cls", "mean")


def pool(hidden, pad_mask, pooling: str):
    """hidden [B, T, H], pad_mask [B, T] bool -> [B, H]: the [CLS] position's state, or the mean over the real
    tokens (pretraining cuts windows from the token stream, so it never shows [CLS]; the mean reads every token)."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = pad_mask.astype(jnp.float32)[..., None]  # [B, T, 1]
    return jnp.sum(hidden.astype(jnp.float32) * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def classifier_model(cfg: BertConfig, num_labels: int, pooling: str = "cls") -> hk.Transformed:
    """apply(params, rng, tokens [B, T], token_types [B, T], pad_mask [B, T] bool, is_training)
    -> [B, num_labels] float32 (for regression use num_labels=1). BERT's pooler, dense + tanh, on what pool()
    takes: [CLS] (BERT's) or the mean of the real tokens; the same params either way."""
    if not isinstance(num_labels, int) or num_labels < 1:
        raise UserError(f"num_labels must be a positive integer, got {num_labels!r}")
    if pooling not in POOLINGS:
        raise UserError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")

    def forward(tokens, token_types, pad_mask, is_training: bool = False):
        with hk.name_scope("bert"):
            hidden, _ = _encoder(cfg, tokens, token_types, pad_mask, is_training)
            with hk.name_scope("pooler"):
                pooled = jnp.tanh(_dense(cfg.hidden_size, "dense")(pool(hidden, pad_mask, pooling)))  # [B, H]
        pooled = _dropout(pooled, cfg.dropout, is_training)
        return _dense(num_labels, "classifier")(pooled).astype(jnp.float32)

    return hk.transform(forward)


# ----------------------------------------------------------------------------------------------------------
# MLM objective (pure functions, jit-friendly, static shapes)

def num_masked(seq_len: int, mask_rate: float) -> int:
    """M, the number of positions chosen per row: round(mask_rate * seq_len)."""
    if not 0.0 < mask_rate < 1.0:
        raise UserError(f"mask rate must be in (0, 1), got {mask_rate}")
    m = round(mask_rate * seq_len)
    if m < 1:
        raise UserError(f"mask rate {mask_rate} chooses no position in sequences of length {seq_len}")
    return m


def mask_tokens(key, tokens, mask_rate: float, vocab_size: int):
    """BERT masking with exactly M = round(mask_rate*T) distinct non-special positions per row.

    Returns inputs [B, T] (80% [MASK], 10% random non-special token, 10% unchanged at the chosen positions),
    positions [B, M] int32, targets [B, M] (the original tokens) and weights [B, M] float32 (0 where a row has
    fewer than M non-special tokens and a special position had to fill the quota; such positions are unchanged).
    """
    B, T = tokens.shape
    M = num_masked(T, mask_rate)
    k_pick, k_kind, k_random = jax.random.split(key, 3)
    special = tokens < NUM_SPECIAL
    scores = jnp.where(special, -1.0, jax.random.uniform(k_pick, (B, T)))  # specials sort last
    _, positions = jax.lax.top_k(scores, M)  # [B, M], distinct
    targets = jnp.take_along_axis(tokens, positions, axis=1)  # [B, M]
    weights = (targets >= NUM_SPECIAL).astype(jnp.float32)
    kind = jax.random.uniform(k_kind, (B, M))
    random_tokens = jax.random.randint(k_random, (B, M), NUM_SPECIAL, vocab_size, dtype=tokens.dtype)
    replaced = jnp.where(kind < 0.8, jnp.asarray(MASK_ID, tokens.dtype), jnp.where(kind < 0.9, random_tokens, targets))
    replaced = jnp.where(weights > 0, replaced, targets)
    inputs = jax.vmap(lambda row, pos, val: row.at[pos].set(val))(tokens, positions, replaced)
    return inputs, positions.astype(jnp.int32), targets, weights


def all_positions(tokens, positions, weights):
    """mask_tokens' choice spread over every position, to decode all T (original BERT) with the same loss.

    tokens [B, T] (the original ones), positions and weights [B, M] -> positions [B, T] (0..T-1 in every row),
    targets [B, T] (tokens) and weights [B, T] (mask_tokens' weights at their positions, 0 elsewhere). mlm_loss
    over these is mlm_loss over the masked positions alone, up to the order of float sums.
    """
    B, T = tokens.shape
    every = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    spread = jax.vmap(lambda pos, w: jnp.zeros(T, jnp.float32).at[pos].set(w))(positions, weights)  # [B, T]
    return every, tokens, spread


@jax.custom_vjp
def cross_entropy(logits, targets):
    """-log softmax(logits)[target]: logits [..., V] float32, targets [...] int -> [...].

    The gradient is written out, softmax - one_hot, so that XLA computes it in one elementwise pass over
    [..., V] instead of autodiff's scatter of the target-logit gradient into a zero tensor.
    """
    return _cross_entropy_fwd(logits, targets)[0]


def _cross_entropy_fwd(logits, targets):
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - target_logit, (logits, lse, targets)


def _cross_entropy_bwd(residuals, g):
    logits, lse, targets = residuals
    one_hot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return (jnp.exp(logits - lse[..., None]) - one_hot) * g[..., None], None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def mlm_loss(logits, targets, weights):
    """Weighted mean cross-entropy and accuracy over the chosen positions, both float32 scalars."""
    logits = logits.astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    nll = cross_entropy(logits, targets)  # [B, M]
    # Correct when the target's logit is the largest: the max that logsumexp takes anyway, not an argmax pass.
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = target_logit >= jnp.max(logits, axis=-1)
    total = jnp.maximum(weights.sum(), 1.0)
    return (nll * weights).sum() / total, (correct * weights).sum() / total


# ----------------------------------------------------------------------------------------------------------
# FLOPs (the MFU convention)

def encoder_params(cfg: BertConfig) -> int:
    """Non-embedding encoder parameters: the layers plus the one LayerNorm outside them."""
    H, I = cfg.hidden_size, cfg.intermediate_size
    attention = 4 * H * H + 4 * H
    mlp = 2 * H * I + I + H
    norms = 2 * 2 * H
    outside = 2 * H if cfg.post_ln else 4 * H  # the embedding LayerNorm, and pre-LN's final one
    return cfg.num_layers * (attention + mlp + norms) + outside


def num_params(cfg: BertConfig) -> int:
    """Every parameter of mlm_model(cfg): the embeddings, the encoder and the MLM head (its decoder is tied)."""
    H = cfg.hidden_size
    embeddings = (cfg.vocab_size + cfg.max_position + cfg.type_vocab_size) * H
    head = H * H + H + 2 * H + cfg.vocab_size  # transform dense, LayerNorm, output bias
    return embeddings + encoder_params(cfg) + head


def flops_per_token(cfg: BertConfig, seq_len: int, mask_rate: float,
                    decoded_fraction: float | None = None) -> float:
    """Training FLOPs per input token: 6*non_embedding_params + 12*L*H*T (attention) + 6*H*V*decoded_fraction.

    decoded_fraction is the fraction of positions the MLM head runs at: mask_rate (the default) when it decodes
    only the masked positions, 1.0 when it decodes all of them (original BERT; train.py --decode_all).
    non_embedding_params counts the encoder at every token and the MLM head's transform (dense + LN) at the
    decoded fraction only, since that is where it runs; the tied decoder is the 6*H*V*decoded_fraction term.
    """
    decoded = mask_rate if decoded_fraction is None else decoded_fraction
    H = cfg.hidden_size
    head = H * H + H + 2 * H
    non_embedding = encoder_params(cfg) + decoded * head
    return 6 * non_embedding + 12 * cfg.num_layers * H * seq_len + 6 * H * cfg.vocab_size * decoded


def matmul_timer(size: int, dtype, repeats: int) -> Callable[[int], float]:
    """The MFU denominator's runner: run(steps) takes steps x `repeats` back-to-back jax.jit(a @ b) on [size, size]
    matrices and returns the seconds (timed in bulk, like training steps, so that a busy machine weighs on both
    alike). Each step is 2 * size**3 * repeats FLOPs."""
    a = jax.random.normal(jax.random.PRNGKey(0), (size, size), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (size, size), dtype)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps * repeats):
            c = matmul(a, b)
        c.block_until_ready()
        return time.perf_counter() - start

    return run


# ----------------------------------------------------------------------------------------------------------
# Optimiser: AdamW as BERT trains with it, for train.py and finetune.py

def decay_mask(params) -> dict:
    """Weight decay on matrices (weights, embeddings) only: not on biases or LayerNorm scales and offsets."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(*, weight_decay: float, b1: float, b2: float, eps: float,
                   clip_norm: float) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (clip_norm 0: none) with a unit learning rate: a step multiplies the
    updates by the scheduled rate, a traced scalar, so that one compiled step serves every rate and schedule."""
    clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    return optax.chain(*clip, optax.adamw(1.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
