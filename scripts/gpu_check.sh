#!/usr/bin/env bash
# The checks that need a GPU, in one command and under 8 minutes (device time is lent in ~15-minute slices):
#
#   scripts/gpu_check.sh [REPORT]          (default REPORT: gpu_check_report.md)
#
# On CUDA, in order of importance, each step bounded by what is left of the budget (GPU_CHECK_BUDGET_S, 450 s):
#   1. the tests marked `cuda` (bfloat16 on the GPU against float32 on the CPU, --offload model and sequential
#      with real streams and pinned memory, --compile, tiled decode, no float64/complex on the device, and any
#      later test marked `cuda`, quantized paths included);
#   2. the `mid` benchmark against diffusers on CUDA (scripts/bench.py);
#   3. peak VRAM, peak host RAM and time per mode on `mid` at 1024x1024: none, model, sequential, --vae-tiling,
#      --compile, each in a fresh process.
# On Apple MPS it runs what applies there (the tests that use no CUDA streams or pinning, modes none and tiled).
# Without either it says so and exits 0. Everything lands in one Markdown report.
# For trying the script itself without a GPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_MODEL=<tiny checkpoint>
# GPU_CHECK_SIZE=256 runs the same steps on the CPU (the cuda tests then skip).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
REPORT=${1:-gpu_check_report.md}
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BUDGET=${GPU_CHECK_BUDGET_S:-450}
START=$(date +%s)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
say() { echo "$*"; echo "$*" >> "$REPORT"; }
# run LIMIT TITLE CMD...: runs CMD with at most LIMIT seconds (or what is left), its output in a fenced block
run() {
    local limit=$1 title=$2; shift 2
    local rest; rest=$(left)
    [ "$rest" -lt "$limit" ] && limit=$rest
    echo "## $title" >> "$REPORT"
    if [ "$limit" -lt 20 ]; then
        say "skipped: the ${BUDGET} s budget is spent"
        return 0
    fi
    echo "== $title (at most ${limit}s)"
    local t0; t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$WORK/out" 2>&1
    local rc=$?
    tail -n 60 "$WORK/out"
    { echo '```'; tail -n 60 "$WORK/out"; echo '```'
      echo "exit $rc$([ $rc -eq 124 ] && echo ' (timed out)') after $(( $(date +%s) - t0 )) s"; echo; } >> "$REPORT"
    return 0
}

DEVICE=$("$PY" - 2>/dev/null <<'EOF'
import torch
print("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "none")
EOF
) || { echo "gpu_check: $PY cannot import torch (set PYTHON=/path/to/venv/bin/python)"; exit 1; }
DEVICE=${GPU_CHECK_DEVICE:-$DEVICE}
SIZE=${GPU_CHECK_SIZE:-1024}

{ echo "# zimage GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"; echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), device: $DEVICE"; echo; } > "$REPORT"
"$PY" - >> "$REPORT" 2>&1 <<'EOF'
import platform, torch
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), Python {platform.python_version()}, "
      f"{platform.machine()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, {p.total_memory / 2**30:.1f} GiB, compute capability {p.major}.{p.minor}\n")
EOF

if [ "$DEVICE" = none ]; then
    say "gpu_check: no CUDA (and no MPS) device is available to PyTorch here: nothing to check. Report: $REPORT"
    exit 0
fi

# 1. tests marked cuda (those that need CUDA skip themselves on MPS)
run 200 "Tests marked cuda on $DEVICE" "$PY" -m pytest -q -m cuda -p no:cacheprovider -rs tests/

# 2. the mid benchmark, zimage against diffusers (CUDA only: bench.py measures VRAM with torch.cuda)
if [ "$DEVICE" = cuda ]; then
    run 150 "mid benchmark on CUDA, bfloat16 (scripts/bench.py)" "$PY" scripts/bench.py mid --device cuda \
        --dtype bfloat16 --quiet-wait 0 --min-free-gib 2 --json "$WORK/bench.json"
else
    echo "## mid benchmark" >> "$REPORT"; say "skipped: scripts/bench.py measures CUDA only"
fi

# 3. per mode: peak VRAM, peak host RAM, seconds; one fresh process each so the peaks are the mode's own
MID=${GPU_CHECK_MODEL:-bench-cache/mid}
if [ ! -f "$MID/model_index.json" ]; then
    run 90 "Writing the mid checkpoint" "$PY" scripts/make_checkpoint.py mid
fi
cat > "$WORK/mode.py" <<'EOF'
import json, resource, sys, tempfile, time
from pathlib import Path
import torch
from zimage.jobs import Job, Settings
from zimage.pipeline import Options, Pipeline

model, device, offload, tile, compile_, size = sys.argv[1], torch.device(sys.argv[2]), *sys.argv[3:6], int(sys.argv[6])
out = Path(tempfile.mkdtemp()) / "a.png"
job = Job(Settings(prompt="a red fox in the snow", width=size, height=size, num_steps=8, seed=1), out, 0, "check", model)
opts = Options(Path(model), device, torch.bfloat16, offload=offload, compile=compile_ == "1",
               vae_tile=int(tile) if tile != "-" else None, progress=False)
t0 = time.perf_counter()
pipe = Pipeline(opts)
pipe.run([job], 1, lambda j, s: None, lambda j, m: sys.exit(m))
steps = pipe.timings.steps
vram = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
        torch.mps.driver_allocated_memory() if device.type == "mps" else 0)  # mps: what the driver holds now
print(json.dumps({"offload": offload, "tile": tile, "compile": compile_ == "1", "seconds": time.perf_counter() - t0,
                  "first_step": steps[0], "later_steps": sum(steps[1:]) / max(1, len(steps) - 1),
                  "decode": pipe.timings.decode, "peak_vram_gib": vram / 2**30,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
EOF
echo "## Peak memory per mode ($MID, bfloat16, ${SIZE}x${SIZE}, 8 steps)" >> "$REPORT"
if [ "$DEVICE" = cuda ]; then
    MODES="none:-:0 model:-:0 sequential:-:0 none:64:0 none:-:1 sequential:-:1"
else
    MODES="none:-:0 none:64:0"
fi
echo '| offload | tile | compile | total s | first step s | later steps s | decode s | peak VRAM GiB | peak RSS GiB |' >> "$REPORT"
echo '|---|---|---|---|---|---|---|---|---|' >> "$REPORT"
for m in $MODES; do
    IFS=: read -r offload tile comp <<< "$m"
    limit=60; [ "$comp" = 1 ] && limit=150
    rest=$(left); [ "$rest" -lt "$limit" ] && limit=$rest
    if [ "$limit" -lt 20 ]; then echo "| $offload | $tile | $comp | skipped: budget spent |||||" >> "$REPORT"; continue; fi
    echo "== mode $m (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$PY" "$WORK/mode.py" "$MID" "$DEVICE" "$offload" "$tile" "$comp" "$SIZE" \
        > "$WORK/mode.out" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        tail -n 1 "$WORK/mode.out"
        "$PY" - "$WORK/mode.out" >> "$REPORT" <<'EOF'
import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f"| {r['offload']} | {r['tile']} | {int(r['compile'])} | {r['seconds']:.1f} | {r['first_step']:.2f} | "
      f"{r['later_steps']:.3f} | {r['decode']:.2f} | {r['peak_vram_gib']:.2f} | {r['peak_rss_gib']:.2f} |")
EOF
    else
        tail -n 20 "$WORK/mode.out"
        why=$([ $rc -eq 124 ] && echo "timed out after ${limit} s" || tail -n 1 "$WORK/mode.out" | cut -c1-150 | tr '|' '/')
        echo "| $offload | $tile | $comp | failed (exit $rc): $why |||||" >> "$REPORT"
    fi
done
say ""
say "gpu_check: done in $(( $(date +%s) - START )) s; report: $REPORT"
