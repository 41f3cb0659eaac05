"""train.py's checkpoints: ckpt_<step>/ folders of plain arrays and JSON, written atomically, found, read back.

    ckpt_00001000/arrays.npz      params and optimiser state; keys are "/"-joined pytree paths ("params/bert/...")
    ckpt_00001000/state.json      step, tokens seen, model config, precision, loss scale, PRNG, flags (run_state)
    ckpt_00001000/tokenizer.json  the tokenizer the data was made with
    ckpt_00001000/manifest.json   written last: each file's size and sha256

A folder is complete once it has its final name: it is written under a temporary one, fsynced and renamed, so a
reader never sees half a checkpoint. Damage after that (a truncated copy, flipped bits, an edited state.json) is
caught by the manifest: --resume skips to the newest checkpoint that verifies, load_checkpoint (finetune.py,
hf.py) refuses. A folder without a manifest (from before manifests) is checked for arrays.npz, a well-formed
state.json and the tokenizer.json that state.json records, no more.

Also finetune.py's model folders (<TASK>.model/: the finetuned classifier, for predict.py and hf.py --export),
verified by their manifest in the same way, with model.json in place of state.json; see the section at the end.
"""
import dataclasses
import json
import os
import re
import shutil
import sys
import zipfile

import jax
import numpy as np

import common
import model as bert
from common import UserError

CKPT_FORMAT = 1
CKPT_RE = re.compile(r"^ckpt_(\d{8})$")
TMP_PREFIX = ".tmp-ckpt_"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------------------------
# Pytrees <-> flat {"prefix/a/b": array}

def path_key(path) -> str:
    """A pytree key path -> "a/b/0/c" (dict keys, sequence indices and attribute names, "/"-joined)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}/{path_key(path)}": np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def unflatten_like(template, arrays: dict, prefix: str, where: str = "checkpoint",
                   needs: str = "this configuration needs"):
    """Fill template's structure (arrays or ShapeDtypeStructs) from arrays[prefix/path]; UserError on mismatch.
    where, needs: how the messages name the source and what decided the template."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for path, leaf in leaves:
        key = f"{prefix}/{path_key(path)}"
        if key not in arrays:
            raise UserError(f"{where} lacks {key}: it was made with another model or optimiser configuration")
        if arrays[key].shape != tuple(leaf.shape):
            raise UserError(f"{where} {key} has shape {arrays[key].shape}, {needs} {tuple(leaf.shape)}")
        out.append(arrays[key].astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def merge_params(fresh: dict, loaded: dict, source: str, encoder: set[str] | frozenset[str] = frozenset(),
                 notes: bool = True) -> tuple[dict, list[str]]:
    """fresh (a model's initial haiku params) with every parameter that loaded has, as float32 numpy arrays.

    -> (params, "module/name" of those left fresh). A shape that differs is an error, and so is a missing
    parameter named in encoder: finetuning must never quietly start from random encoder weights. notes: print
    which modules stay fresh and which loaded ones this model has no use for.
    """
    new, unused = sorted(set(fresh) - set(loaded)), sorted(set(loaded) - set(fresh))
    if notes and new:
        print(f"note: {source} lacks {', '.join(new)}: initialised fresh")
    if notes and unused:
        print(f"note: {source}: not used by this model: {', '.join(unused)}")
    out, kept = {}, []
    for module, leaves in fresh.items():
        out[module] = {}
        for name, value in leaves.items():
            got = loaded.get(module, {}).get(name)
            if got is None:
                if f"{module}/{name}" in encoder:
                    raise UserError(f"{source} lacks encoder parameter {module}/{name}")
                kept.append(f"{module}/{name}")
            elif tuple(got.shape) != tuple(value.shape):
                raise UserError(f"{source}: {module}/{name} has shape {tuple(got.shape)}, the model needs "
                                f"{tuple(value.shape)}")
            out[module][name] = np.asarray(value if got is None else got, np.float32)
    return out, kept


# ----------------------------------------------------------------------------------------------------------------
# state.json

def run_state(*, step: int, tokens_seen: int, skipped_steps: int, cfg: bert.BertConfig, precision: str,
              loss_scale: dict | None, seed: int, tokenizer_sha256: str, args: dict, num_devices: int) -> dict:
    """state.json: where a run is and what it needs to continue (args: its flags; loss_scale: fp16's
    {"value", "counter"}, else None)."""
    return dict(format=CKPT_FORMAT, step=step, tokens_seen=tokens_seen, config=dataclasses.asdict(cfg),
                precision=precision, loss_scale=loss_scale, skipped_steps=skipped_steps,
                rng={"seed": seed, "key": np.asarray(jax.random.PRNGKey(seed)).tolist(),
                     "masking": "fold_in(fold_in(PRNGKey(seed), 1), step)"},
                reader_seed=seed, tokenizer_sha256=tokenizer_sha256, args=args,
                num_devices=num_devices, jax_version=jax.__version__)


# state.json's fields and their types. Every checkpoint has LOAD_FIELDS; train.py --resume needs RESUME_FIELDS.
STATE_TYPES = {"step": int, "tokens_seen": int, "skipped_steps": int, "config": dict, "precision": str,
               "loss_scale": (dict, type(None)), "tokenizer_sha256": str, "args": dict}
LOAD_FIELDS = ("step",)
RESUME_FIELDS = tuple(STATE_TYPES)


def state_problem(state, fields: tuple[str, ...] = LOAD_FIELDS) -> str | None:
    """What is wrong with a state.json's contents, or None: it must be an object, have `fields`, and every field
    of STATE_TYPES it has must be of that type (counts: whole numbers >= 0; precision: one of model.py's)."""
    if not isinstance(state, dict):
        return f"state.json holds {type(state).__name__} {str(state)[:40]}, not a JSON object"
    for name, kind in STATE_TYPES.items():
        if name not in state:
            if name in fields:
                return f"state.json lacks {name}"
            continue
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is int and value < 0) or \
                (name == "precision" and value not in bert.PRECISIONS):
            return f"state.json: {name} is {json.dumps(value)[:40]}, not {_KIND_WORDS[name]}"
    return None


_KIND_WORDS = {"step": "a whole number", "tokens_seen": "a whole number", "skipped_steps": "a whole number",
               "config": "an object", "precision": f"one of {', '.join(bert.PRECISIONS)}",
               "loss_scale": "an object or null", "tokenizer_sha256": "a string", "args": "an object"}


def model_config(state: dict) -> bert.BertConfig:
    """The model a checkpoint's state.json describes."""
    try:
        return bert.BertConfig(**state["config"])
    except (TypeError, KeyError) as e:
        raise UserError(f"checkpoint {state['path']}: unreadable model config in state.json ({e})") from None


# ----------------------------------------------------------------------------------------------------------------
# Finding, reading, writing

def checkpoint_folders(out_dir: str) -> list[str]:
    """The complete checkpoint folders in out_dir, oldest first (temp folders are never complete)."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, name) for name in sorted(os.listdir(out_dir)) if CKPT_RE.match(name)
            and os.path.isfile(os.path.join(out_dir, name, "state.json"))]


def latest_checkpoint(out_dir: str, skip_damaged: bool = False, fields: tuple[str, ...] = LOAD_FIELDS) -> str | None:
    """The newest complete checkpoint folder in out_dir; skip_damaged: the newest that verifies (damage, with
    fields), saying on stderr which newer ones it skipped and why."""
    for folder in reversed(checkpoint_folders(out_dir)):
        if not skip_damaged or (problem := damage(folder, fields)) is None:
            return folder
        print(f"warning: skipped damaged checkpoint {folder}: {problem}", file=sys.stderr)
    return None


def file_record(path: str) -> dict:
    return {"size": os.path.getsize(path), "sha256": common.sha256_file(path)}


def write_manifest(folder: str) -> None:
    """manifest.json, written last: the size and sha256 of every file the folder holds."""
    common.atomic_write_json(os.path.join(folder, MANIFEST), {"files": {
        name: file_record(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}})


def manifest_damage(folder: str) -> str | None:
    """What is wrong with a folder according to its manifest.json, or None if it verifies or has none."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            files = json.load(f)["files"]
        if not isinstance(files, dict) or not files:
            raise TypeError(f"files is {files!r}, not a JSON object of file records")
    except FileNotFoundError:
        files = None  # written before manifests existed
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({common.first_line(e)})"
    for name, want in (files or {}).items():
        path = os.path.join(folder, name)
        if not (isinstance(want, dict) and set(want) == {"size", "sha256"}):
            return f"unreadable {MANIFEST} (the record of {name} is {want!r})"
        if not os.path.isfile(path):
            return f"{name} is missing"
        if (got := file_record(path)) != want:
            what = "size" if got["size"] != want["size"] else "sha256"
            return f"{name} does not match the manifest ({what} {got[what]}, written {want[what]})"
    return None


def damage(folder: str, fields: tuple[str, ...] = LOAD_FIELDS) -> str | None:
    """What is wrong with a checkpoint folder, or None if it is whole: its manifest and the files it records (where
    there is one), that arrays.npz and state.json are there, state.json's contents (state_problem; fields: those it
    must have) and the tokenizer.json copy against state.json's tokenizer_sha256."""
    if problem := manifest_damage(folder):
        return problem
    for name in ("arrays.npz", "state.json"):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} is missing"
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return f"unreadable state.json ({common.first_line(e)})"
    if problem := state_problem(state, fields):
        return problem
    tokenizer = os.path.join(folder, "tokenizer.json")
    if "tokenizer_sha256" in state and os.path.isfile(tokenizer) and \
            (got := common.sha256_file(tokenizer)) != state["tokenizer_sha256"]:
        return (f"tokenizer.json is not the run's tokenizer (sha256 {got}, state.json records "
                f"{state['tokenizer_sha256']})")
    return None


def read_state(path: str, fields: tuple[str, ...] = LOAD_FIELDS) -> dict:
    """A checkpoint folder's state.json, checked (state_problem; fields: those it must have)."""
    try:
        with open(os.path.join(path, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read checkpoint {path}: {common.first_line(e)}") from None
    if problem := state_problem(state, fields):
        raise UserError(f"checkpoint {path}: {problem}")
    return state


def read_arrays(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(os.path.join(path, "arrays.npz")) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read checkpoint {path}: {common.first_line(e)}") from None


def load_checkpoint(path: str) -> tuple[dict, dict]:
    """(params, state) from a ckpt_* folder, or from the latest complete checkpoint of an out_dir.

    params: the haiku params {module: {name: np.ndarray float32}} of model.mlm_model(config); its encoder names
    are those of model.classifier_model. state: state.json (step, tokens_seen, config (BertConfig fields),
    precision, args, ...) plus "path" (the folder) and "tokenizer_path" (its tokenizer.json copy).
    """
    folder = path if os.path.isfile(os.path.join(path, "state.json")) else latest_checkpoint(path)
    if folder is None:
        raise UserError(f"no complete checkpoint at {path} (expected a ckpt_* folder or a train.py --out_dir)")
    if problem := damage(folder):
        raise UserError(f"damaged checkpoint {folder}: {problem}")
    state = read_state(folder)
    params: dict = {}
    for key, value in read_arrays(folder).items():
        if key.startswith("params/"):
            module, name = key[len("params/"):].rsplit("/", 1)  # haiku params are exactly {module: {name: array}}
            params.setdefault(module, {})[name] = value
    state.update(path=folder, tokenizer_path=os.path.join(folder, "tokenizer.json"))
    return params, state


def save_checkpoint(out_dir: str, state: dict, arrays: dict[str, np.ndarray], tokenizer_bytes: bytes,
                    keep: int) -> str:
    """Write ckpt_<step>/ atomically (temp folder, fsync, rename), then drop all but the newest `keep`."""
    final = os.path.join(out_dir, f"ckpt_{state['step']:08d}")
    if os.path.isdir(final) and damage(final) is None:  # already saved (a resumed run stopped at once): same contents
        return final
    with common.atomic_dir(final, os.path.join(out_dir, f"{TMP_PREFIX}{state['step']:08d}.{os.getpid()}")) as tmp:
        write_arrays(os.path.join(tmp, "arrays.npz"), arrays)
        common.atomic_write_bytes(os.path.join(tmp, "tokenizer.json"), tokenizer_bytes)
        common.atomic_write_json(os.path.join(tmp, "state.json"), state)
        write_manifest(tmp)
    complete = sorted(name for name in os.listdir(out_dir) if CKPT_RE.match(name))
    for name in complete[:-keep]:  # renamed first, so that a half-deleted folder never looks complete
        os.rename(os.path.join(out_dir, name), os.path.join(out_dir, f"{TMP_PREFIX}old.{name}"))
    for name in os.listdir(out_dir):  # those, and leftovers of writes that died with their process
        if name.startswith(TMP_PREFIX):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return final


def write_arrays(path: str, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------------------------
# finetune.py's model folders: the finetuned classifier it reports, for predict.py and hf.py --export
#
#     SST-2.model/arrays.npz      the classifier's params ("params/bert/...", "params/classifier/w", ...)
#     SST-2.model/model.json      task, label names (null: a regression score), pooling, max_len, precision, the
#                                 model config, and where the weights came from (seed, epoch, dev metrics, lr, init)
#     SST-2.model/tokenizer.json  the tokenizer it was finetuned with
#     SST-2.model/manifest.json   written last: each file's size and sha256

MODEL_FORMAT = 1
MODEL_JSON = "model.json"
MODEL_FILES = ("arrays.npz", MODEL_JSON, "tokenizer.json", MANIFEST)


@dataclasses.dataclass
class Classifier:
    cfg: bert.BertConfig
    params: dict  # {module: {name: float32 np.ndarray}} of model.classifier_model(cfg, num_labels, pooling)
    task: str  # GLUE's spelling (SST-2)
    labels: list[str] | None  # label name per class id; None: one regression score
    pooling: str
    max_len: int  # tokens per example it was finetuned with
    precision: str
    info: dict  # model.json as written
    tokenizer_path: str
    path: str

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)


def is_model_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MODEL_JSON))


def check_model_folder_target(folder: str, overwrite: bool) -> None:
    """An output model folder: new, or with overwrite one that holds only a model folder's files."""
    if not os.path.lexists(folder):
        return
    if not overwrite:
        raise UserError(f"{folder} already exists; pass --overwrite to replace it")
    if not os.path.isdir(folder):
        raise UserError(f"{folder} is a file, not a model folder finetune.py wrote")
    other = sorted(set(os.listdir(folder)) - set(MODEL_FILES))
    if other:
        raise UserError(f"{folder} holds {other[0]}, which a model folder does not; --overwrite replaces only a "
                        "model folder finetune.py wrote")


def save_model_folder(folder: str, params: dict, info: dict, tokenizer_bytes: bytes) -> None:
    """Write a model folder atomically (temp folder, fsync, rename; an existing one is replaced). info: model.json,
    which must hold task, labels, pooling, max_len, precision and config (BertConfig fields)."""
    folder = folder.rstrip("/") or folder
    with common.atomic_dir(folder, f"{folder}.tmp.{os.getpid()}") as tmp:
        write_arrays(os.path.join(tmp, "arrays.npz"), flatten(params, "params"))
        common.atomic_write_bytes(os.path.join(tmp, "tokenizer.json"), tokenizer_bytes)
        common.atomic_write_json(os.path.join(tmp, MODEL_JSON), {"format": MODEL_FORMAT, **info})
        write_manifest(tmp)


def load_model_folder(path: str) -> Classifier:
    """A model folder finetune.py saved, verified against its manifest; anything else is a UserError."""
    what = "a model folder finetune.py saved (<out_dir>/<TASK>.model)"
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a folder (expected {what})")
    if not is_model_folder(path):
        raise UserError(f"{path} has no {MODEL_JSON}: not {what}")
    if not os.path.isfile(os.path.join(path, MANIFEST)):
        raise UserError(f"damaged model folder {path}: {MANIFEST} is missing")
    if problem := manifest_damage(path):
        raise UserError(f"damaged model folder {path}: {problem}")
    try:
        with open(os.path.join(path, MODEL_JSON)) as f:
            info = json.load(f)
        labels, pooling, max_len = info["labels"], info["pooling"], info["max_len"]
        cfg = bert.BertConfig(**info["config"])
        if not isinstance(info["task"], str) or not isinstance(info["precision"], str):
            raise TypeError("task and precision must be strings")
        if labels is not None and (not isinstance(labels, list) or not labels
                                   or not all(isinstance(x, str) for x in labels)):
            raise TypeError(f"labels must be a list of names or null, got {labels!r}")
        if pooling not in bert.POOLINGS:
            raise TypeError(f"pooling must be one of {', '.join(bert.POOLINGS)}, got {pooling!r}")
        if not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_position:
            raise TypeError(f"max_len must be an integer in [2, {cfg.max_position}], got {max_len!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"model folder {path}: unreadable {MODEL_JSON} ({common.first_line(e)})") from None
    except UserError as e:
        raise UserError(f"model folder {path}: {MODEL_JSON}: {e}") from None
    arrays = read_arrays(path)
    num_labels = 1 if labels is None else len(labels)
    tokens = np.zeros((1, 2), np.int32)
    template = jax.eval_shape(bert.classifier_model(cfg, num_labels, pooling).init, jax.random.PRNGKey(0),
                              tokens, tokens, tokens > 0)
    params = unflatten_like(template, arrays, "params", where=f"model folder {path}: arrays.npz",
                            needs=f"its {MODEL_JSON} ({num_labels} label(s), hidden size {cfg.hidden_size}) implies")
    extra = sorted(set(arrays) - {f"params/{m}/{n}" for m, leaves in template.items() for n in leaves})
    if extra:
        raise UserError(f"model folder {path}: arrays.npz holds {extra[0]}, which its {MODEL_JSON}'s model lacks")
    return Classifier(cfg, params, info["task"], labels, pooling, max_len, info["precision"], info,
                      os.path.join(path, "tokenizer.json"), path)
