"""plateau_probe.py: the context-shuffle test of word-order use."""
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as bert  # noqa: E402
import plateau_probe  # noqa: E402


def test_a_model_without_positions_loses_nothing_when_the_context_is_shuffled():
    cfg = bert.make_config("tiny", 64, num_layers=1, hidden_size=32, num_heads=2)
    windows = np.random.default_rng(0).integers(5, 64, size=(8, 16)).astype(np.int32)  # [N, T]
    params = bert.mlm_model(cfg).init(jax.random.PRNGKey(0), windows, np.zeros((8, 2), np.int32))
    params["bert/embeddings/position"]["embeddings"] = params["bert/embeddings/position"]["embeddings"] * 3.0
    with_positions = plateau_probe.order_losses(params, cfg, windows, 0.15, seed=0)
    assert abs(with_positions["shuffled"] - with_positions["loss"]) > 1e-4  # order matters to this model
    params["bert/embeddings/position"]["embeddings"] = 0 * params["bert/embeddings/position"]["embeddings"]
    bag_of_words = plateau_probe.order_losses(params, cfg, windows, 0.15, seed=0)
    assert abs(bag_of_words["shuffled"] - bag_of_words["loss"]) < 1e-5  # a bag of words cannot tell
    assert np.isfinite(bag_of_words["no_context"])
