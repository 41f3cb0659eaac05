"""checkpoint.py: flat arrays <-> pytrees, merging loaded params into a model's, atomic folders, state.json."""
import json
import os

import jax
import numpy as np
import optax
import pytest

import checkpoint
import common
from common import UserError
from conftest import damage_checkpoint


def test_flatten_and_unflatten_round_trip_with_optimiser_state():
    params = {"bert/dense": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0))
    opt_state = tx.init(params)
    arrays = {**checkpoint.flatten(params, "params"), **checkpoint.flatten(opt_state, "opt_state")}
    assert "params/bert/dense/w" in arrays and "opt_state/1/0/mu/bert/dense/w" in arrays  # the on-disk keys
    back = checkpoint.unflatten_like(jax.eval_shape(tx.init, params), arrays, "opt_state")
    assert jax.tree.structure(back) == jax.tree.structure(opt_state)
    with pytest.raises(UserError, match="lacks params/bert/dense/b"):
        checkpoint.unflatten_like(params, {"params/bert/dense/w": arrays["params/bert/dense/w"]}, "params")
    with pytest.raises(UserError, match="has shape"):
        checkpoint.unflatten_like(params, {**arrays, "params/bert/dense/b": np.zeros(4)}, "params")


def test_merge_params_keeps_fresh_what_is_missing_and_refuses_wrong_shapes(capsys):
    fresh = {"bert/dense": {"w": np.zeros((2, 2)), "b": np.zeros(2)}, "classifier": {"w": np.ones((2, 1))}}
    loaded = {"bert/dense": {"w": np.full((2, 2), 3.0)}, "mlm_head": {"output_bias": np.ones(5)}}
    params, kept = checkpoint.merge_params(fresh, loaded, "src")
    assert kept == ["bert/dense/b", "classifier/w"] and params["bert/dense"]["w"].dtype == np.float32
    np.testing.assert_array_equal(params["bert/dense"]["w"], loaded["bert/dense"]["w"])
    out = capsys.readouterr().out
    assert "src lacks classifier: initialised fresh" in out and "not used by this model: mlm_head" in out
    with pytest.raises(UserError, match="src lacks encoder parameter bert/dense/b"):
        checkpoint.merge_params(fresh, loaded, "src", encoder={"bert/dense/b"}, notes=False)
    with pytest.raises(UserError, match="src: bert/dense/w has shape"):
        checkpoint.merge_params(fresh, {"bert/dense": {"w": np.zeros(3)}}, "src", notes=False)
    assert capsys.readouterr().out == ""


def test_model_config_of_a_bad_state_is_a_user_error():
    with pytest.raises(UserError, match="unreadable model config"):
        checkpoint.model_config({"path": "ckpt_00000001", "config": {"vocab_size": 10}})


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = str(tmp_path)
    state = lambda step: dict(step=step, tokens_seen=10 * step)  # noqa: E731
    arrays = {"params/bert/dense/w": np.ones((2, 3), np.float32), "opt_state/0/count": np.array(1)}
    checkpoint.save_checkpoint(out, state(1), arrays, b"tok", keep=2)
    os.makedirs(os.path.join(out, checkpoint.TMP_PREFIX + "00000005.999"))  # a write whose process was killed

    def dies_half_way(path, arrays):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "write_arrays", dies_half_way)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(out, state(2), {k: v + 1 for k, v in arrays.items()}, b"tok", keep=2)
    assert checkpoint.latest_checkpoint(out) == os.path.join(out, "ckpt_00000001")
    params, loaded = checkpoint.load_checkpoint(out)
    assert loaded["step"] == 1 and params == {"bert/dense": {"w": params["bert/dense"]["w"]}}
    np.testing.assert_array_equal(params["bert/dense"]["w"], np.ones((2, 3)))
    monkeypatch.undo()
    for step in (3, 4, 5):
        checkpoint.save_checkpoint(out, state(step), arrays, b"tok", keep=2)
    assert sorted(os.listdir(out)) == ["ckpt_00000004", "ckpt_00000005"]  # old ones and leftovers gone
    with pytest.raises(UserError, match="no complete checkpoint"):
        checkpoint.load_checkpoint(str(tmp_path / "nothing"))


@pytest.mark.parametrize("fault", ["truncate", "bitflip", "empty_state"])
def test_a_damaged_checkpoint_is_named_and_skipped(tmp_path, capsys, fault):
    out = str(tmp_path)
    arrays = {"params/bert/dense/w": np.arange(6000, dtype=np.float32).reshape(2, 3000)}
    for step in (1, 2):
        checkpoint.save_checkpoint(out, dict(step=step, tokens_seen=step), arrays, b"tok", keep=3)
    newest = os.path.join(out, "ckpt_00000002")
    assert checkpoint.damage(newest) is None
    damage_checkpoint(newest, fault)
    assert checkpoint.latest_checkpoint(out) == newest  # a plain look finds it; only verifying tells
    assert checkpoint.latest_checkpoint(out, skip_damaged=True) == os.path.join(out, "ckpt_00000001")
    name = "state.json" if fault == "empty_state" else "arrays.npz"
    err = capsys.readouterr().err
    assert err.startswith(f"warning: skipped damaged checkpoint {newest}: {name} does not match the manifest (")
    assert err.count("\n") == 1
    for path in (newest, out):  # loading names it, whether given as the folder or as its out_dir
        with pytest.raises(UserError, match=f"damaged checkpoint {newest}: {name} does not match"):
            checkpoint.load_checkpoint(path)
    checkpoint.save_checkpoint(out, dict(step=2, tokens_seen=2), arrays, b"tok", keep=3)  # rewritten, not kept
    assert checkpoint.damage(newest) is None and checkpoint.load_checkpoint(out)[1]["step"] == 2


def test_checkpoints_from_before_the_manifest_still_load_and_bad_zips_are_user_errors(tmp_path):
    folder = checkpoint.save_checkpoint(str(tmp_path), dict(step=1, tokens_seen=1), {"params/a/w": np.ones(3)},
                                        b"tok", keep=1)
    os.remove(os.path.join(folder, checkpoint.MANIFEST))
    assert checkpoint.load_checkpoint(folder)[0]["a"]["w"].tolist() == [1, 1, 1]
    damage_checkpoint(folder, "truncate")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        checkpoint.load_checkpoint(folder)


@pytest.mark.parametrize("fault", ["manifest_files_empty_list", "manifest_files_null", "manifest_entry_a_string",
                                   "state_without_step", "state_step_abc", "state_a_list", "state_an_int",
                                   "no_manifest_no_arrays"])
def test_bad_manifests_and_states_are_damage_that_resume_skips(tmp_path, capsys, fault):
    out = str(tmp_path)
    for step in (1, 2):
        checkpoint.save_checkpoint(out, dict(step=step, tokens_seen=step), {"params/a/w": np.ones(3)}, b"tok", keep=3)
    newest = os.path.join(out, "ckpt_00000002")
    damage_checkpoint(newest, fault)
    problem = checkpoint.damage(newest)
    assert problem and problem.split()[0] in ("unreadable", "state.json", "state.json:", "arrays.npz")
    assert checkpoint.latest_checkpoint(out, skip_damaged=True) == os.path.join(out, "ckpt_00000001")
    err = capsys.readouterr().err
    assert err == f"warning: skipped damaged checkpoint {newest}: {problem}\n"
    with pytest.raises(UserError, match=f"damaged checkpoint {newest}: "):
        checkpoint.load_checkpoint(newest)


def test_resume_needs_the_whole_state_and_a_foreign_tokenizer_is_damage(tmp_path, capsys):
    """A state.json without the fields --resume needs is skipped on resume only; a tokenizer.json that is not the
    one state.json records (manifest gone, so nothing else tells) is damage everywhere."""
    out = str(tmp_path)
    whole = dict(step=1, tokens_seen=1, skipped_steps=0, config={}, precision="fp32", loss_scale=None,
                 tokenizer_sha256=common.sha256_bytes(b"tok"), args={})
    checkpoint.save_checkpoint(out, whole, {"params/a/w": np.ones(3)}, b"tok", keep=3)
    checkpoint.save_checkpoint(out, dict(step=2, tokens_seen=2), {"params/a/w": np.ones(3)}, b"tok", keep=3)
    assert checkpoint.latest_checkpoint(out, skip_damaged=True) == os.path.join(out, "ckpt_00000002")
    resumable = checkpoint.latest_checkpoint(out, skip_damaged=True, fields=checkpoint.RESUME_FIELDS)
    assert resumable == os.path.join(out, "ckpt_00000001")
    assert "ckpt_00000002: state.json lacks skipped_steps" in capsys.readouterr().err
    assert checkpoint.read_state(resumable, checkpoint.RESUME_FIELDS)["args"] == {}
    json_edit(resumable, precision="fp8")  # read_state checks the fields itself, manifest or not
    with pytest.raises(UserError, match='precision is "fp8", not one of'):
        checkpoint.read_state(resumable)
    folder = checkpoint.save_checkpoint(out, dict(whole, step=3), {"params/a/w": np.ones(3)}, b"tok", keep=3)
    os.remove(os.path.join(folder, checkpoint.MANIFEST))
    with open(os.path.join(folder, "tokenizer.json"), "wb") as f:
        f.write(b"another tokenizer")
    with pytest.raises(UserError, match="tokenizer.json is not the run's tokenizer"):
        checkpoint.load_checkpoint(folder)


def json_edit(folder: str, **fields) -> None:
    path = os.path.join(folder, "state.json")
    state = json.load(open(path))
    with open(path, "w") as f:
        json.dump({**state, **fields}, f)
