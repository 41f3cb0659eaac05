#!/usr/bin/env bash
# One call on a GPU machine: pretrain BERT for a wall-clock budget, export it for transformers, time BERT-base.
#
#   bash gpu_pretrain.sh prepare    # here, on a CPU machine with pip: .gpu/ (tokenizer, token files, wheels)
#   bash gpu_pretrain.sh            # there, with .gpu/ carried: results in $OUT
#   GPU_PRETRAIN_DRY_RUN=1 OUT=/tmp/dry bash gpu_pretrain.sh    # the same steps on a CPU, tiny model and budget
#
# The run: installs the carried wheels (dm-haiku, jmp, tensorboardX) into a temporary folder on PYTHONPATH; trains
# train.py in bf16 for GPU_MINUTES (--max_minutes: the schedules end at the budget); exports the final checkpoint
# with hf.py --export in bf16 shards under 16 MiB; writes plot_log.py's tables and plot; runs bench.py --model base
# for one round. $OUT gets hf/model-*.safetensors (the weights) and run.tar.gz (hf/'s other files, train.log,
# loss.png, log.md, log.json, bench.log, env.txt). Restore: tar xzf run.tar.gz -C DEST && cp hf/*.safetensors DEST/hf/
# A time guard (GPU_TOTAL_SECONDS, default 530) stops each stage so that the whole call ends in time.
#
# Settings (environment): GPU_DIR (.gpu), GPU_TOKENIZER ($GPU_DIR/tokenizer.json), GPU_DATA ($GPU_DIR/data),
# GPU_WORK (/tmp/gpu_pretrain: train.py's out_dir and scratch), GPU_MINUTES (6.5), GPU_TOTAL_SECONDS (530),
# GPU_MAX_TOKENS (a cap on the budget's max_tokens: none; 40960 in a dry run), PYTHON (python3); for prepare:
# GPU_TEXT ('../shared/data/wikipedia/AA/*'), GPU_VOCAB (16384), GPU_PREPARE_WHEELS (1; 0 = skip the download).
# Relative paths are relative to the repository root (the script's folder).
set -euo pipefail
cd "$(dirname "$0")"

GPU_DIR=${GPU_DIR:-.gpu}
TOKENIZER=${GPU_TOKENIZER:-$GPU_DIR/tokenizer.json}
DATA=${GPU_DATA:-$GPU_DIR/data}
PY=${PYTHON:-python3}
WHEELS="dm-haiku==0.0.17 jmp==0.0.4 tensorboardX==2.6.5"  # what the device image lacks (its KINDS.md list)
export PYTHONUNBUFFERED=1

say() { echo "gpu_pretrain: $*"; }
die() { echo "gpu_pretrain: error: $*" >&2; exit 2; }

if [[ ${1:-run} == prepare ]]; then
    TEXT=${GPU_TEXT:-../shared/data/wikipedia/AA/*}
    mkdir -p "$GPU_DIR"
    say "tokenizer (vocabulary ${GPU_VOCAB:-16384}) and token files from $TEXT into $GPU_DIR"
    $PY tokenizer.py --text_files "$TEXT" --num_docs 0 --vocab_size "${GPU_VOCAB:-16384}" --out "$TOKENIZER" --overwrite
    $PY data.py --text_files "$TEXT" --num_docs 0 --tokenizer "$TOKENIZER" --out "$DATA" --overwrite
    if [[ ${GPU_PREPARE_WHEELS:-1} == 1 ]]; then
        say "wheels for the device's Python 3.12 (x86-64) into $GPU_DIR/wheels"
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$GPU_DIR/wheels" $WHEELS
    fi
    du -sh "$GPU_DIR"
    say "prepared; carry $GPU_DIR (it must stay under the 64 MiB the device call takes)"
    exit 0
elif [[ ${1:-run} != run ]]; then
    die "unknown command '$1' (use: prepare, or no argument to run)"
fi

# ------------------------------------------------------------------------------------------------------------
# The run
START=$SECONDS
TOTAL=${GPU_TOTAL_SECONDS:-530}
[[ -n ${OUT:-} ]] || die "OUT is not set: the folder whose files come back (the device machine sets it)"
[[ -f $TOKENIZER ]] || die "no tokenizer $TOKENIZER: run 'bash gpu_pretrain.sh prepare' first and carry $GPU_DIR"
[[ -f $DATA/meta.json ]] || die "no token files in $DATA: run 'bash gpu_pretrain.sh prepare' first and carry $GPU_DIR"
left() { echo $((TOTAL - (SECONDS - START))); }

if [[ ${GPU_PRETRAIN_DRY_RUN:-0} == 1 ]]; then  # the same steps, small enough for a CPU in a test
    MINUTES=${GPU_MINUTES:-5}
    CAP=${GPU_MAX_TOKENS:-40960}  # ends a dry run in seconds, while a busy CPU still has minutes to compile
    MODEL=(--model tiny --num_layers 1 --hidden_size 64 --num_heads 2 --precision bf16 --seq_len 32
           --seq_len_start 16 --batch_size 16 --batch_size_start 8 --micro_batch_size 8 --eval_every 20k
           --eval_windows 32 --peak_flops 1e11)
    BENCH=(--model tiny --precision bf16 --batch_size 8 --seq_len 32 --steps 2 --rounds 1 --peak_size 256 --no-hf)
    WORK=${GPU_WORK:-$(mktemp -d)}
else
    MINUTES=${GPU_MINUTES:-6.5}
    CAP=${GPU_MAX_TOKENS:-}
    MODEL=(--model small --precision bf16 --seq_len 128 --seq_len_start 16 --batch_size 1024 --batch_size_start 512
           --micro_batch_size 512 --eval_every 50M --eval_windows 1024 --peak_flops 989e12)
    BENCH=(--model base --precision bf16 --batch_size 256 --steps 10 --rounds 1 --peak_size 8192 --peak_tflops 989
           --no-hf)
    WORK=${GPU_WORK:-/tmp/gpu_pretrain}
fi
RECIPE=(--seq_warmup_frac 0.2 --batch_warmup_frac 0.05 --mask_rate 0.25 --lr 1e-3 --warmup_frac 0.06
        --ckpt_every 0 --log_every 100 ${CAP:+--max_tokens $CAP})
mkdir -p "$OUT" "$WORK/pack/hf"
[[ -z $(ls -A "$OUT") ]] || die "$OUT is not empty"
[[ ! -e $WORK/out ]] || die "$WORK/out exists: choose another GPU_WORK"

{ date -u; nvidia-smi -L 2>/dev/null || echo "nvidia-smi: none"; nproc; $PY --version; } > "$WORK/pack/env.txt"
if compgen -G "$GPU_DIR/wheels/*.whl" > /dev/null; then
    say "installing $(ls "$GPU_DIR"/wheels/*.whl | wc -l) carried wheels into $WORK/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
        "$GPU_DIR"/wheels/*.whl
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
else
    say "no wheels in $GPU_DIR/wheels: using the installed packages"
fi
$PY -c "import jax, haiku, jmp, optax, tensorboardX, tokenizers; print('jax', jax.__version__, jax.devices())" \
    | tee -a "$WORK/pack/env.txt" || die "a package is missing (see above): carry its wheel in $GPU_DIR/wheels"

say "pretraining for $MINUTES minutes (whole call: $TOTAL s, $(left) s left)"
train_rc=0
timeout --signal=TERM --kill-after=20 "$(( $(left) - 60 ))" \
    $PY train.py --data_dir "$DATA" --tokenizer "$TOKENIZER" --out_dir "$WORK/out" --max_minutes "$MINUTES" \
    "${MODEL[@]}" "${RECIPE[@]}" 2>&1 | tee "$WORK/pack/train.log" || train_rc=$?
[[ $train_rc == 0 ]] || say "train.py exited with $train_rc (143: stopped by the time guard, with a checkpoint)"
compgen -G "$WORK/out/ckpt_*" > /dev/null || die "train.py wrote no checkpoint (exit $train_rc; see above)"

say "exporting the final checkpoint ($(left) s left)"
$PY hf.py --export "$WORK/out" "$WORK/hf" --dtype bf16 --shard_mb 15
mkdir -p "$OUT/hf"
mv "$WORK"/hf/*.safetensors "$OUT/hf/"
cp "$WORK"/hf/*.json "$WORK/pack/hf/"
plot=()
$PY -c "import matplotlib" 2>/dev/null || { plot=(--no_plot); say "no matplotlib: loss.png skipped"; }
$PY plot_log.py "$WORK/out" --out "$WORK/pack" "${plot[@]}"

bench_rc=0
if (( $(left) > 60 )); then
    say "bench.py ${BENCH[*]} ($(left) s left)"
    timeout --kill-after=10 "$(( $(left) - 15 ))" $PY bench.py "${BENCH[@]}" 2>&1 | tee "$WORK/pack/bench.log" \
        || bench_rc=$?
else
    say "bench.py skipped: $(left) s left" | tee "$WORK/pack/bench.log"
fi
tar czf "$OUT/run.tar.gz" -C "$WORK/pack" .

files=$(find "$OUT" -type f | wc -l)
big=$(find "$OUT" -type f -size +16777215c)
total=$(du -cb $(find "$OUT" -type f) | tail -1 | cut -f1)
say "\$OUT: $files files, $total bytes: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
(( files <= 8 )) && [[ -z $big ]] && (( total <= 64 * 1024 * 1024 )) \
    || die "\$OUT exceeds what comes back (8 files, 16 MiB each, 64 MiB in all)"
say "summary: $(grep -E '^max_tokens ' "$WORK/pack/train.log" | cut -c1-200 || true)"
say "summary: $(grep -E '^eval step' "$WORK/pack/train.log" | tail -1 || true)"
say "summary: $(grep -E 'MFU against the datasheet|^\| ours' "$WORK/pack/bench.log" | tr '\n' ' ' || true)"
say "done in $((SECONDS - START)) s (train.py exit $train_rc, bench.py exit $bench_rc)"
(( train_rc == 0 && bench_rc == 0 ))
