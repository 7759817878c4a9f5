#!/usr/bin/env bash
# The figures of the README and the closing notes, measured on the embedded demo model in
# one run, one command after the other (so the machine's load hits them alike).
#
#   bash benchmarks/demo_figures.sh [WORKDIR]      # default: figures-run/ (about 45 minutes here)
#
# Every command is one a user can type; its stdout (JSON where the command has --json) goes
# to WORKDIR/<step>.out, its summary (stderr) to WORKDIR/<step>.log, and `/usr/bin/time -v` adds wall time and peak RSS there.
set -euo pipefail

WORK=${1:-figures-run}
mkdir -p "$WORK"
cd "$WORK"
VLSPARSE=${VLSPARSE:-vlsparse}

step() {  # step NAME ARGS...: run `vlsparse ARGS`, stdout to NAME.out, summary + time to NAME.log
  local name=$1
  shift
  echo "== $name: vlsparse $*" >&2
  /usr/bin/time -v "$VLSPARSE" "$@" >"$name.out" 2>"$name.log" || { tail -5 "$name.log" >&2; return 1; }
  grep -E "Elapsed|Maximum resident" "$name.log" >&2 || true
}

# 1. dense accuracy (issue 3); demo-long's dense accuracy is in sparse-long below (same samples)
step eval-vqa eval --task demo-vqa --n 500 --json
step eval-multi eval --task demo-multi --n 100 --json
step eval-grid eval --task demo-grid --n 100 --json

# 2. attention profiles at 4k, 8k and 16k tokens on the default calibration (multi and grid
#    prompts; issue 4), and profiles fitted to one task's prompts (--calib demo:multi / demo:grid)
step profile-4k profile --seq-len 4096
step profile-8k profile --seq-len 8192 --out profile-8k/demo.yaml    # outside ./profiles: prune carries the 4k one
step profile-16k profile --seq-len 16384 --out profile-16k/demo.yaml
step profile-4k-multi profile --seq-len 4096 --calib demo:multi --out profile-4k-multi/demo.yaml
step profile-5k-grid profile --seq-len 5376 --calib demo:grid --out profile-5k-grid/demo.yaml
step profile-8k-multi profile --seq-len 8192 --calib demo:multi --out profile-8k-multi/demo.yaml

# 3. the sparse runtime on the long tasks, dense and sparse in turn on the same samples (issue 5);
#    each task with a profile made at its length: the default one, then the one fitted to the task
step sparse-multi eval --task demo-multi --n 100 --profile profiles/demo.yaml --json
step sparse-grid eval --task demo-grid --n 100 --profile profiles/demo.yaml --json
step sparse-long eval --task demo-long --n 100 --profile profile-8k/demo.yaml --json
step sparse-multi-fit eval --task demo-multi --n 100 --profile profile-4k-multi/demo.yaml --json
step sparse-grid-fit eval --task demo-grid --n 100 --profile profile-5k-grid/demo.yaml --json
step sparse-long-fit eval --task demo-long --n 100 --profile profile-8k-multi/demo.yaml --json
step bench-attention bench attention --seq 8192,32768 --densities 0.1 --json

# 4. pruning at 50%: three allocations, and the packed size (issue 6)
for allocation in ecoflap owl uniform; do
  step "prune-$allocation" prune --ratio 0.5 --allocation "$allocation" --out "demo-$allocation-50" --force
  step "eval-vqa-$allocation" eval --model "demo-$allocation-50" --task demo-vqa --n 500 --json
done
step prune-packed prune --ratio 0.5 --pack --out demo-ecoflap-50-packed --force
du -sb demo-ecoflap-50 demo-ecoflap-50-packed >sizes.txt  # checkpoint folders on disk, bytes

# 5. core neurons and core tokens, then everything end to end (issue 7)
step calibrate calibrate --force              # adds the core section to ./profiles/demo.yaml (replaces it)
step calibrate-pruned calibrate --model demo-ecoflap-50  # -> ./profiles/demo-ecoflap-50.yaml (bench e2e finds it)
step bench-e2e bench e2e --pruned demo-ecoflap-50 --n 50 --json
echo "done: $(pwd)" >&2
