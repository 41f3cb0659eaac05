import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
from common import MASK_ID, UserError  # noqa: E402

VOCAB = 50


def small_config(vocab_size=VOCAB, **overrides):
    kwargs = dict(hidden_size=32, num_heads=2, intermediate_size=64, max_position=16)
    kwargs.update(overrides)
    return model.make_config("tiny", vocab_size, **kwargs)


@pytest.fixture(autouse=True)
def restore_precision():
    yield
    model.set_precision("fp32")


def random_tokens(key, shape, vocab=VOCAB):
    return jax.random.randint(key, shape, 0, vocab, dtype=jnp.int32)


def perturbed(params, seed=0):
    """Init params plus noise, so that every bias, LayerNorm scale/offset and table entry matters."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


# ---------------------------------------------------------------------------------------------------------
# A hand-written float64 numpy forward pass, to check the wiring of both layouts.

_erf = np.vectorize(math.erf)


def np_layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["offset"]


def np_gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def np_dense(x, p):
    return x @ p["w"] + p["b"]


def np_attention(x, P, prefix, num_heads, pad_mask=None):
    B, T, H = x.shape
    D = H // num_heads
    qkv = np_dense(x, P[f"{prefix}/qkv"])  # query, key, value side by side
    q, k, v = (qkv[:, :, i * H:(i + 1) * H].reshape(B, T, num_heads, D) for i in range(3))
    logits = np.einsum("btnd,bsnd->bnts", q, k) / math.sqrt(D)
    if pad_mask is not None:
        logits = np.where(pad_mask[:, None, None, :], logits, -1e30)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bnts,bsnd->btnd", probs, v).reshape(B, T, H)
    return np_dense(out, P[f"{prefix}/output"])


def np_encoder(params, cfg, tokens, token_types=None, pad_mask=None):
    P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    eps, T = cfg.layer_norm_eps, tokens.shape[1]
    types = np.zeros_like(tokens) if token_types is None else token_types
    x = (P["bert/embeddings/word"]["embeddings"][tokens] + P["bert/embeddings/position"]["embeddings"][:T]
         + P["bert/embeddings/token_type"]["embeddings"][types])
    x = np_layer_norm(x, P["bert/embeddings/layer_norm"], eps)
    for i in range(cfg.num_layers):
        L = f"bert/layer_{i}"
        mlp = lambda h: np_dense(np_gelu(np_dense(h, P[f"{L}/mlp/intermediate"])), P[f"{L}/mlp/output"])
        if cfg.post_ln:
            x = np_layer_norm(x + np_attention(x, P, f"{L}/attention", cfg.num_heads, pad_mask),
                              P[f"{L}/attention_layer_norm"], eps)
            x = np_layer_norm(x + mlp(x), P[f"{L}/mlp_layer_norm"], eps)
        else:
            x = x + np_attention(np_layer_norm(x, P[f"{L}/attention_layer_norm"], eps), P, f"{L}/attention",
                                 cfg.num_heads, pad_mask)
            x = x + mlp(np_layer_norm(x, P[f"{L}/mlp_layer_norm"], eps))
    if not cfg.post_ln:
        x = np_layer_norm(x, P["bert/final_layer_norm"], eps)
    return x, P


def np_full_mlm_logits(params, cfg, tokens):
    """The decoder applied at every position: [B, T, V]."""
    x, P = np_encoder(params, cfg, tokens)
    h = np_layer_norm(np_gelu(np_dense(x, P["mlm_head/transform"])), P["mlm_head/layer_norm"], cfg.layer_norm_eps)
    return h @ P["bert/embeddings/word"]["embeddings"].T + P["mlm_head"]["output_bias"]


def init_mlm(cfg, B=3, T=12, M=4, seed=0):
    f = model.mlm_model(cfg)
    tokens = random_tokens(jax.random.PRNGKey(seed), (B, T))
    positions = jnp.tile(jnp.arange(M, dtype=jnp.int32), (B, 1))
    params = f.init(jax.random.PRNGKey(seed + 1), tokens, positions)
    return f, perturbed(params, seed + 2), tokens


@functools.lru_cache(maxsize=None)
def shared_mlm(post_ln=False):
    """One initialised 2-layer model per layout, shared by the tests (each new shape costs compile time)."""
    return init_mlm(small_config(post_ln=post_ln))


# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_shapes_and_dtypes(precision):
    _, params, tokens = shared_mlm()
    B, T = tokens.shape
    positions = jnp.array([[0, 5, 11, 1], [3, 4, 7, 0], [9, 2, 1, 6]], jnp.int32)
    reference = model.mlm_model(small_config()).apply(params, None, tokens, positions)  # float32 compute

    policy = model.set_precision(precision)
    assert policy.param_dtype == jnp.float32 and policy.output_dtype == jnp.float32
    assert policy.compute_dtype == model.PRECISIONS[precision]
    f = model.mlm_model(small_config())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(jax.eval_shape(f.init, jax.random.PRNGKey(0),
                                                                                    tokens, positions)))
    apply = jax.jit(f.apply)
    logits = apply(params, None, tokens, positions)
    assert logits.shape == (B, 4, VOCAB) and logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, atol=0.1)  # low precision stays close to float32
    # The matmuls really run in the compute dtype.
    short = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
    hlo = apply.lower(params, None, tokens, positions).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert dots and all(f"x{short}>" in line for line in dots)

    c = model.classifier_model(small_config(), num_labels=3)
    types, pad = jnp.zeros_like(tokens), jnp.ones((B, T), bool)
    cparams = jax.eval_shape(lambda key: c.init(key, tokens, types, pad, False), jax.random.PRNGKey(1))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(cparams))
    cparams = {**params, "bert/pooler/dense": {"w": jnp.eye(32), "b": jnp.zeros(32)},
               "classifier": {"w": jnp.ones((32, 3)), "b": jnp.zeros(3)}}
    out = jax.jit(c.apply, static_argnums=5)(cparams, None, tokens, types, pad, False)
    assert out.shape == (B, 3) and out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("post_ln", [False, True])
def test_forward_matches_handwritten_reference(post_ln):
    cfg = small_config(post_ln=post_ln)
    f, params, tokens = shared_mlm(post_ln)
    positions = jnp.array([[0, 3, 7, 11], [1, 2, 4, 8], [11, 10, 9, 0]], jnp.int32)
    logits = f.apply(params, None, tokens, positions)
    full = np_full_mlm_logits(params, cfg, np.asarray(tokens))  # [B, T, V]
    expected = np.take_along_axis(full, np.asarray(positions)[:, :, None], axis=1)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_layouts_have_the_right_layer_norms():
    pre, post = shared_mlm(False)[1], shared_mlm(True)[1]
    assert "bert/final_layer_norm" in pre and "bert/final_layer_norm" not in post
    assert "bert/embeddings/layer_norm" in pre and "bert/embeddings/layer_norm" in post
    assert set(pre) - {"bert/final_layer_norm"} == set(post)


def test_decoder_at_positions_equals_gathered_full_logits():
    cfg = small_config()
    f, params, tokens = shared_mlm()
    B, T = tokens.shape
    apply = f.apply
    everywhere = apply(params, None, tokens, jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1)))  # [B, T, V]
    np.testing.assert_allclose(everywhere, np_full_mlm_logits(params, cfg, np.asarray(tokens)), rtol=1e-5, atol=1e-5)
    positions = jax.random.permutation(jax.random.PRNGKey(5), jnp.tile(jnp.arange(T), (B, 1)), axis=1,
                                       independent=True)[:, :5].astype(jnp.int32)
    picked = apply(params, None, tokens, positions)
    np.testing.assert_allclose(picked, np.take_along_axis(np.asarray(everywhere), np.asarray(positions)[..., None], 1),
                               rtol=1e-5, atol=1e-5)


def test_no_full_vocabulary_tensor_in_the_training_graph():
    cfg = small_config(num_layers=1, vocab_size=997, max_position=64)
    f = model.mlm_model(cfg)
    B, T, M = 2, 64, 3
    tokens = random_tokens(jax.random.PRNGKey(0), (B, T), 997)
    positions = jnp.zeros((B, M), jnp.int32)
    params = f.init(jax.random.PRNGKey(1), tokens, positions)
    loss = lambda p: model.mlm_loss(f.apply(p, None, tokens, positions), positions, jnp.ones((B, M)))[0]
    hlo = jax.jit(jax.grad(loss)).lower(params).as_text()
    assert f"{B}x{M}x997" in hlo
    assert f"{B}x{T}x997" not in hlo


# ---------------------------------------------------------------------------------------------------------
# Attention details: padding mask and dropout.

@pytest.mark.parametrize("pooling", model.POOLINGS)
def test_padding_does_not_change_the_real_positions(pooling):
    cfg = small_config(num_layers=2, post_ln=True)
    c = model.classifier_model(cfg, num_labels=2, pooling=pooling)
    B, T, real = 2, 12, 7
    tokens = random_tokens(jax.random.PRNGKey(0), (B, T))
    types = jnp.concatenate([jnp.zeros((B, 4), jnp.int32), jnp.ones((B, T - 4), jnp.int32)], axis=1)
    pad = jnp.arange(T)[None, :] < real
    params = perturbed(c.init(jax.random.PRNGKey(1), tokens, types, pad, False))
    apply = c.apply
    padded = apply(params, None, tokens, types, jnp.broadcast_to(pad, (B, T)), False)
    other_padding = jnp.where(pad, tokens, 0)
    padded2 = apply(params, None, other_padding, types.at[:, real:].set(0), jnp.broadcast_to(pad, (B, T)), False)
    unpadded = apply(params, None, tokens[:, :real], types[:, :real], jnp.ones((B, real), bool), False)
    np.testing.assert_allclose(padded, unpadded, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(padded2, unpadded, rtol=1e-5, atol=1e-6)
    # And the whole encoder agrees with the reference at the real positions, pad mask included.
    full_mask = jnp.broadcast_to(pad, (B, T))
    hidden, P = np_encoder(params, cfg, np.asarray(tokens), np.asarray(types), np.asarray(full_mask))
    chosen = hidden[:, 0] if pooling == "cls" else hidden[:, :real].mean(axis=1)  # [B, H]
    pooled = np.tanh(np_dense(chosen, P["bert/pooler/dense"]))
    np.testing.assert_allclose(padded, np_dense(pooled, P["classifier"]), rtol=1e-5, atol=1e-5)


def test_written_out_attention_matches_jax_attention():
    q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 6, 3, 4)) for i in range(3))
    mask = (jnp.arange(6)[None, :] < jnp.array([[6], [4]]))[:, None, None, :]
    heads_first = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731 ([B, T, N, D] <-> [B, N, T, D])
    ours = model._softmax_attention(heads_first(q / 2.0), heads_first(k), heads_first(v), mask, dropout_rate=0.0)
    np.testing.assert_allclose(heads_first(ours), jax.nn.dot_product_attention(q, k, v, mask=mask), rtol=1e-5,
                               atol=1e-6)  # ours takes q already scaled by 1/sqrt(4)


def test_dropout_only_when_training():
    no_dropout_model, params, tokens = shared_mlm()
    f = model.mlm_model(small_config(dropout=0.3))
    positions = jnp.tile(jnp.arange(4, dtype=jnp.int32), (3, 1))
    no_dropout = no_dropout_model.apply(params, None, tokens, positions)
    apply = f.apply
    np.testing.assert_allclose(apply(params, None, tokens, positions, False), no_dropout, rtol=1e-5, atol=1e-6)
    a = apply(params, jax.random.PRNGKey(0), tokens, positions, True)
    b = apply(params, jax.random.PRNGKey(0), tokens, positions, True)
    c = apply(params, jax.random.PRNGKey(1), tokens, positions, True)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, no_dropout) and not np.allclose(a, c)


# ---------------------------------------------------------------------------------------------------------
# Masking and loss.

def test_masking_statistics():
    B, T, V, rate = 4096, 128, 30000, 0.15
    key_tokens, key_special, key_mask = jax.random.split(jax.random.PRNGKey(0), 3)
    tokens = jax.random.randint(key_tokens, (B, T), 5, V, dtype=jnp.int32)
    special = jax.random.randint(key_special, (B, T), 0, 5, dtype=jnp.int32)
    tokens = jnp.where(jax.random.uniform(key_special, (B, T)) < 0.2, special, tokens)  # 20% special tokens
    inputs, positions, targets, weights = jax.jit(model.mask_tokens, static_argnums=(2, 3))(key_mask, tokens, rate, V)
    inputs, positions, targets, weights, tokens = map(np.asarray, (inputs, positions, targets, weights, tokens))
    M = round(rate * T)
    assert positions.shape == targets.shape == weights.shape == (B, M)
    assert positions.dtype == np.int32 and weights.dtype == np.float32
    assert inputs.shape == tokens.shape and inputs.dtype == tokens.dtype
    assert all(len(set(row)) == M for row in positions)  # distinct positions per row
    np.testing.assert_array_equal(targets, np.take_along_axis(tokens, positions, 1))
    assert (targets >= 5).all() and (weights == 1).all()  # never special; enough candidates in every row
    chosen = np.zeros((B, T), bool)
    np.put_along_axis(chosen, positions, True, axis=1)
    np.testing.assert_array_equal(inputs[~chosen], tokens[~chosen])  # only chosen positions change
    new = np.take_along_axis(inputs, positions, 1)
    masked, unchanged = new == MASK_ID, new == targets
    randomized = ~masked & ~unchanged
    n = B * M
    assert abs(masked.sum() / n - 0.8) < 0.01
    assert abs(randomized.sum() / n - 0.1) < 0.01
    assert abs(unchanged.sum() / n - 0.1) < 0.01
    assert new[randomized].min() >= 5 and new[randomized].max() < V
    # Random replacements cover the non-special ids roughly uniformly.
    assert new[randomized].mean() == pytest.approx((5 + V - 1) / 2, rel=0.03)


def test_masking_exact_count_and_short_rows():
    for rate in (0.15, 0.25, 0.5):  # 1.5 -> 2, 2.5 -> 2, 5
        tokens = jnp.full((2, 10), 7, jnp.int32)
        _, positions, _, _ = model.mask_tokens(jax.random.PRNGKey(0), tokens, rate, VOCAB)
        assert positions.shape == (2, round(rate * 10))
    # A row with only 2 non-special tokens: both chosen, the other picks get weight 0 and stay unchanged.
    tokens = jnp.array([[2, 9, 0, 0, 0, 11, 3, 0, 0, 0],
                        [2, 9, 8, 7, 6, 11, 12, 13, 14, 3]], jnp.int32)
    inputs, positions, targets, weights = model.mask_tokens(jax.random.PRNGKey(0), tokens, 0.4, VOCAB)
    assert positions.shape == (2, 4)
    assert weights[0].sum() == 2 and set(np.asarray(positions[0])[np.asarray(weights[0]) == 1]) == {1, 5}
    assert weights[1].sum() == 4 and (targets[1] >= 5).all()
    np.testing.assert_array_equal(inputs[0, [0, 2, 3, 4, 6, 7, 8, 9]], tokens[0, [0, 2, 3, 4, 6, 7, 8, 9]])
    with pytest.raises(UserError):
        model.mask_tokens(jax.random.PRNGKey(0), tokens, 0.01, VOCAB)  # rounds to no position


def test_mlm_loss_matches_definition():
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 7)) * 3
    targets = jnp.array([[0, 1, 2], [3, 4, 5]])
    weights = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    loss, accuracy = model.mlm_loss(logits, targets, weights)
    L = np.asarray(logits, np.float64)
    nll = -(L - np.log(np.exp(L).sum(-1, keepdims=True)))
    nll = np.take_along_axis(nll, np.asarray(targets)[..., None], -1)[..., 0]
    w = np.asarray(weights)
    assert loss.dtype == accuracy.dtype == jnp.float32
    assert float(loss) == pytest.approx((nll * w).sum() / w.sum(), rel=1e-6)
    correct = np.asarray(logits).argmax(-1) == np.asarray(targets)
    assert float(accuracy) == pytest.approx((correct * w).sum() / w.sum())
    # The written-out gradient equals autodiff of the plain formula.
    plain = lambda L: (jax.nn.logsumexp(L, -1) - jnp.take_along_axis(L, targets[..., None], -1)[..., 0])  # noqa
    reference = jax.grad(lambda L: (plain(L) * weights).sum() / weights.sum())(logits)
    np.testing.assert_allclose(jax.grad(lambda L: model.mlm_loss(L, targets, weights)[0])(logits), reference,
                               rtol=1e-5, atol=1e-7)
    perfect = jax.nn.one_hot(targets, 7) * 100.0
    loss, accuracy = model.mlm_loss(perfect, targets, weights)
    assert float(accuracy) == 1.0 and float(loss) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Config, parameter sharing, FLOPs.

def test_presets():
    expected = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768),
                "large": (24, 1024)}
    for name, (layers, hidden) in expected.items():
        cfg = model.make_config(name, 30522)
        assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size) == (
            layers, hidden, hidden // 64, 4 * hidden)
        assert not cfg.post_ln and cfg.dropout == 0.0 and cfg.max_position == 512
    cfg = model.make_config("mini", 100, hidden_size=384, num_layers=3, post_ln=True)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.intermediate_size, cfg.post_ln) == (
        3, 384, 6, 1536, True)


@pytest.mark.parametrize("bad", [
    dict(preset="tiny", num_heads=3),
    dict(preset="mini", hidden_size=300, num_heads=7),
    dict(preset="huge"),
    dict(preset="tiny", num_layer=3),
    dict(preset="tiny", num_layers=0),
    dict(preset="tiny", dropout=1.0),
    dict(preset="tiny", vocab_size=5),
])
def test_bad_config_is_a_user_error(bad):
    bad = dict(bad)
    with pytest.raises(UserError):
        model.make_config(bad.pop("preset"), bad.pop("vocab_size", 1000), **bad)


def test_other_user_errors():
    with pytest.raises(UserError):
        model.set_precision("fp8")
    with pytest.raises(UserError):
        model.classifier_model(small_config(), 0)
    with pytest.raises(UserError, match="pooling"):
        model.classifier_model(small_config(), 2, pooling="max")
    f = model.mlm_model(small_config(max_position=8))
    with pytest.raises(UserError, match="max_position"):
        f.init(jax.random.PRNGKey(0), jnp.zeros((1, 9), jnp.int32), jnp.zeros((1, 2), jnp.int32))


@pytest.mark.parametrize("post_ln", [False, True])
def test_classifier_shares_encoder_parameters(post_ln):
    cfg = small_config(post_ln=post_ln)
    f, mlm_params, tokens = shared_mlm(post_ln)
    c = model.classifier_model(cfg, num_labels=4)
    types, pad = jnp.zeros_like(tokens), jnp.ones(tokens.shape, bool)
    cparams = c.init(jax.random.PRNGKey(0), tokens, types, pad, False)
    encoder = {name for name in mlm_params if name.startswith("bert/")}
    assert encoder == {name for name in cparams if name.startswith("bert/") and name != "bert/pooler/dense"}
    assert set(cparams) - encoder == {"bert/pooler/dense", "classifier"}
    assert set(mlm_params) - encoder == {"mlm_head", "mlm_head/transform", "mlm_head/layer_norm"}
    for name in encoder:
        assert jax.tree.map(jnp.shape, cparams[name]) == jax.tree.map(jnp.shape, mlm_params[name])
    # Finetuning starts from the pretrained encoder: swapping it in changes the output.
    started = {**cparams, **{name: mlm_params[name] for name in encoder}}
    apply = c.apply
    fresh = apply(cparams, None, tokens, types, pad, False)
    assert not np.allclose(apply(started, None, tokens, types, pad, False), fresh)


@pytest.mark.parametrize("post_ln", [False, True])
def test_flops_per_token_against_hand_count(post_ln):
    cfg = small_config(post_ln=post_ln)
    _, params, _ = shared_mlm(post_ln)
    count = lambda names: sum(x.size for name in names for x in jax.tree.leaves(params[name]))
    embeddings = {"bert/embeddings/word", "bert/embeddings/position", "bert/embeddings/token_type"}
    head = {"mlm_head/transform", "mlm_head/layer_norm"}
    encoder = {name for name in params if name.startswith("bert/")} - embeddings
    assert model.encoder_params(cfg) == count(encoder)
    L, H, V, T, rate = cfg.num_layers, cfg.hidden_size, cfg.vocab_size, 12, 0.15
    expected = 6 * (count(encoder) + rate * count(head)) + 12 * L * H * T + 6 * H * V * rate
    assert model.flops_per_token(cfg, T, rate) == pytest.approx(expected)
    every = 6 * (count(encoder) + count(head)) + 12 * L * H * T + 6 * H * V  # the head at all T positions
    assert model.flops_per_token(cfg, T, rate, decoded_fraction=1.0) == pytest.approx(every)
    # Closed form for BERT-base: 12 layers of 12H^2 + 13H parameters, plus the embedding and final LayerNorms.
    base = model.make_config("base", 30522)
    H = 768
    enc = 12 * (12 * H * H + 13 * H) + 4 * H
    assert model.encoder_params(base) == enc == 85_054_464 + 4 * H
    assert model.flops_per_token(base, 128, 0.15) == pytest.approx(
        6 * (enc + 0.15 * (H * H + 3 * H)) + 12 * 12 * H * 128 + 6 * H * 30522 * 0.15)


def test_weight_decay_only_on_matrices():
    params = {"bert/layer_0/attention/query": {"w": np.ones((4, 4)), "b": np.ones(4)},
              "bert/layer_0/mlp_layer_norm": {"scale": np.ones(4), "offset": np.ones(4)},
              "bert/embeddings/word": {"embeddings": np.ones((9, 4))}, "mlm_head": {"output_bias": np.ones(9)}}
    mask = model.decay_mask(params)
    assert mask["bert/layer_0/attention/query"] == {"w": True, "b": False}
    assert mask["bert/layer_0/mlp_layer_norm"] == {"scale": False, "offset": False}
    assert mask["bert/embeddings/word"]["embeddings"] and not mask["mlm_head"]["output_bias"]

