#!/usr/bin/env bash
# The objective-ablation models of BENCHMARKS.md's learning-quality table.
#
#   benchmarks/ablation_models.sh runs/data-<hash>    # make run's data folder (cloze run --until pretrain)
#
# Each model is configs/local.toml's pretraining recipe (tiny 2 x 128, BBC News, the make-run
# data's vocabulary, 40% masking, lr 2e-3, 1 worker with 2 CPUs, seed 12345) with one change,
# its objective mix. The mlm + sop model is make run's own (runs/pretrain-<hash>/model).
# Equal compute: mlm and mlm + nsp run make run's 2,500 steps of 32 pairs; rtd + mlm
# (ELECTRA: a generator of a quarter of the heads plus a discriminator labelling every token)
# costs 0.546 s a step against 0.240 s, so it gets the same wall time: 1,098 steps.
# Writes runs/abl-data-nsp and runs/abl-{mlm,nsp,rtd}/model; a finished model is not redone.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: benchmarks/ablation_models.sh runs/data-<hash> (make run\'s data folder)}
test -f "$data/manifest.json" || { echo "$data: not a cloze data folder" >&2; exit 2; }
cloze=.venv/bin/cloze

pretrain() {  # name data objectives [overrides...]
    local name=$1 shards=$2 objectives=$3
    shift 3
    if [ -f "runs/$name/model/model.safetensors" ]; then
        echo "runs/$name/model: done"
        return
    fi
    "$cloze" pretrain --config configs/local.toml --pretrain.data "$shards" --pretrain.name "$name" \
        --pretrain.objectives "$objectives" "$@"
}

# NSP needs its own pairs (a random next segment half the time), over the same vocabulary
if [ ! -f runs/abl-data-nsp/manifest.json ]; then
    "$cloze" data --config configs/local.toml --data.task nsp --data.tokenizer "$data" --data.output runs/abl-data-nsp
fi
pretrain abl-mlm "$data" '{mlm = 1.0}'
pretrain abl-nsp runs/abl-data-nsp '{mlm = 1.0, nsp = 1.0}'
pretrain abl-rtd "$data" '{rtd = 50.0, mlm = 1.0}' --pretrain.max_steps 1098
