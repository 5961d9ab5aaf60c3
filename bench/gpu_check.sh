#!/usr/bin/env bash
# The GPU checks and numbers, for a bare CUDA machine that has torch, triton, transformers, numpy,
# safetensors, tokenizers and pytest but not the server stack. Run from the repository root:
#
#   bash bench/gpu_check.sh OUT_DIR [MODEL.gguf]
#
# 1. the GPU tests: Triton kernels against their torch twins on CUDA, greedy output with CUDA
#    graphs against CPU float64 (with and without MTP), the packed projections;
# 2. decode tok/s at batch 1, 8 and 64 against the HBM bound, random weights of 1B and 8B shapes;
# 3. with MODEL (the default model's GGUF): decode with MTP off / fixed k / adaptive, CUDA graphs
#    on and, for comparison, off (--enforce-eager).
# WHEELS=dir installs the few pure-Python packages the engine imports from a local wheel folder;
# PARTS=tests,random,model picks what runs (default: all three).
set -euo pipefail

out=${1:?usage: bench/gpu_check.sh OUT_DIR [MODEL.gguf]}
model=${2:-}
mkdir -p "$out"
pkg=$(mktemp -d)
ln -s "$PWD" "$pkg/mtpserve"  # the repository root is the package
if [ -n "${WHEELS:-}" ]; then
    # unpacked, not installed: no pip needed, and the environment's own packages stay as they are
    python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
        "$pkg" "$WHEELS"/*.whl
fi
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
    | tee "$out/device.txt"

parts=${PARTS:-tests,random,model}

if [[ $parts == *tests* ]]; then
echo "== GPU tests"
python3 -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_gpu_graphs.py \
    tests/test_quant_cuda.py tests/test_triton_engine.py 2>&1 | tail -15 | tee "$out/tests.txt" || true
fi

if [[ $parts == *random* ]]; then
echo "== decode against the HBM bound (random weights)"
for shape in llama-1b llama-8b; do
    python3 -m mtpserve.bench.decode_speed --random-weights "$shape" --batch-sizes 1,8,64 \
        --json "$out/decode-$shape.json" 2>&1 | tail -12 | tee "$out/decode-$shape.txt" || true
done
fi

if [[ $parts == *model* && -n "$model" ]]; then
    bench() {  # mtpserve bench without the CLI's server imports
        python3 - "$@" <<'EOF'
import argparse
import logging
import sys

from mtpserve.cli import bench
from mtpserve.cli.engine_args import add_engine_args

logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
parser = argparse.ArgumentParser()
add_engine_args(parser, speculation=False)
bench.add_args(parser)
sys.exit(bench.run(parser.parse_args(sys.argv[1:])) or 0)
EOF
    }
    common=(--model "$model" --mtp-head heads/smollm2-135m-instruct --device cuda
            --sections decode,pp --per-kind 2 --repeats 1 --k 1,3 --no-plots)
    echo "== default model, CUDA graphs"
    bench "${common[@]}" --out "$out/default-graphs" 2>&1 | grep -v "captured [0-9]*/" | tail -40
    echo "== default model, eager"
    bench "${common[@]}" --sections decode --per-kind 1 --enforce-eager --out "$out/default-eager" 2>&1 | tail -30
fi
