"""gpu_pretrain.sh, dry-run on the CPU: prepare on a tiny corpus, then the whole run (pretraining for a budget,
export, plot, bench) with GPU_PRETRAIN_DRY_RUN=1's tiny model, through the same steps the GPU call takes."""
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import hf  # noqa: E402
from conftest import make_docs  # noqa: E402

pytestmark = pytest.mark.skipif(not (shutil.which("bash") and shutil.which("tar") and shutil.which("timeout")),
                                reason="needs bash, tar and timeout")


def test_dry_run_writes_what_comes_back(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    docs = make_docs(600)
    for i in range(3):  # wiki_* files: one JSON document a line, as the Wikipedia sample
        (text / f"wiki_{i:02d}").write_text("".join(json.dumps({"id": str(j), "title": "t", "text": d}) + "\n"
                                                    for j, d in enumerate(docs[i::3])))
    env = {**os.environ, "PYTHON": sys.executable, "GPU_DIR": str(tmp_path / "gpu"), "GPU_TEXT": f"{text}/wiki_*",
           "GPU_VOCAB": "200", "GPU_PREPARE_WHEELS": "0", "JAX_PLATFORMS": "cpu"}
    prepared = subprocess.run(["bash", "gpu_pretrain.sh", "prepare"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr

    out = tmp_path / "out"
    env.update(GPU_PRETRAIN_DRY_RUN="1", OUT=str(out), GPU_WORK=str(tmp_path / "work"), GPU_MINUTES="5")
    run = subprocess.run(["bash", "gpu_pretrain.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "gpu_pretrain: summary: max_tokens" in run.stdout and "train.py exit 0, bench.py exit 0" in run.stdout

    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["hf/model.safetensors", "run.tar.gz"]
    restored = tmp_path / "restored"
    with tarfile.open(out / "run.tar.gz") as tar:
        tar.extractall(restored, filter="data")
    for name in ("train.log", "log.md", "log.json", "bench.log", "env.txt", "hf/config.json", "hf/tokenizer.json"):
        assert (restored / name).is_file(), name
    shutil.copy(out / "hf" / "model.safetensors", restored / "hf")
    cfg, params, _, _ = hf.load_hf(str(restored / "hf"))  # what transformers users and --init_hf get
    assert (cfg.num_layers, cfg.hidden_size) == (1, 64)
    assert json.loads((restored / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    log = (restored / "train.log").read_text()
    assert "max_tokens " in log and "eval step" in log and "did not finish" not in log
    assert "MFU" in (restored / "bench.log").read_text()
