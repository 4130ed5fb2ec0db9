#!/usr/bin/env bash
# Every GPU check of the project in one command, sized for one device lease (15 minutes of device time,
# at most 10 per command, of which a machine's start takes 1-2): a CUDA + bf16 test run and the
# SDXL-size benchmarks whose figures the README still lacks.
#
#   make gpu-wheels                       # here, once: .whl/ with the packages the GPU image lacks
#   device tool: run(command="bash benchmarks/gpu_checks.sh", carry=[".whl"], timeout_s=590)
#
# Each section runs under its own time limit (they add up to 540 s, 1,295 s with GPU_CHECKS_FULL=1, which
# needs a second command or a longer lease; a stopped section gets 10 s more to exit, and the wheel install
# takes seconds) and writes $OUT/<section>.log, so a
# section that runs out of time or fails leaves the others' results; $OUT/summary.md lists exit codes
# and durations. gpu_sdxl.py prints each measured row as it goes. The machine's image has torch,
# accelerate, peft, transformers and pytest; diffusers, lpips, elatentlpips (the
# LPIPS benchmark's reference) and setuptools < 81 (its pkg_resources, which elatentlpips imports) come
# from .whl/, and the repository root is put on the path as the package `diffdistill`.
set -u
OUT=${OUT:-build/gpu_checks}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
echo "# GPU checks $(date -u +%FT%TZ)" > "$SUMMARY"

# Without the wheels every section would fail on its imports: stop before spending the lease.
[ -d .whl ] || { echo ".whl/ missing: run make gpu-wheels here and carry .whl" | tee -a "$SUMMARY"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >> "$SUMMARY"; exit 1; }
mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/diffdistill
export PYTHONPATH=/tmp/site:/tmp/pkg${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
python3 -c "import torch, diffusers, peft, transformers, accelerate as a; print('- versions: torch', torch.__version__, \
'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, \
'accelerate', a.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')" \
    >> "$SUMMARY" 2>&1

# GPU_CHECKS_SECTIONS="03 02" runs only the sections whose names start with one of those (a rerun).
section() {  # section NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    if [ -n "${GPU_CHECKS_SECTIONS:-}" ] && ! [[ " $GPU_CHECKS_SECTIONS " == *" ${name%%-*} "* ]]; then
        return 0
    fi
    start=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    echo "- $name: exit $rc after $(( $(date +%s) - start )) s (limit $limit s)" >> "$SUMMARY"
}

# Most wanted first: a later section is the one a short lease cuts (the whole default run: ~540 s, so run it
# with timeout_s=590). Issue 24's open GPU figures lead: E-LatentLPIPS against the official package and the bare
# trunk (eager and CUDA-graph compiled), the MFU of every SDXL step (eager), FLUX's one-step methods on one shared
# base (issue 22/23: does batch >= 1 fit 80 GB?), and the compiled speed-up of SIM (against 02's eager SIM row).
# Diffusion2GAN runs with APT's approximate R1 (exact R1 peaked at 109 GiB on the first lease).
section 01-lpips 150 python3 benchmarks/lpips.py --device cuda --size 128 --batch 8 --reps 10 --bf16 \
    --channels-last --draws 0 --pixel-batches --official-ref-ops --compile-mode reduce-overhead
section 02-mfu-sdxl 200 python3 benchmarks/gpu_sdxl.py --batches 8 --warmup 1 --repeats 1 --memory_cap_gib 78 \
    --r1_approximate_sigma 0.1
section 03-flux 110 python3 benchmarks/gpu_flow.py --model flux --batches 1 2 --warmup 1 --repeats 1 \
    --memory_cap_gib 78
# SIM alone (its speed-up against 02's eager SIM row): a regional compile of the SDXL UNet takes about a minute.
section 04-mfu-sdxl-compiled 80 python3 benchmarks/gpu_sdxl.py --batches 8 --warmup 2 --repeats 1 \
    --memory_cap_gib 78 --compile --methods sim --no_reference
if [ "${GPU_CHECKS_FULL:-0}" = 1 ]; then
    # Library components on CUDA (float32 vs CPU float64, bf16 autocast) and every SDXL script's 2-step smoke
    # run, which accelerate places on the GPU (the FSDP/DDP runs are CPU-only: skipped).
    section 05-tests-cuda 100 env CUBLAS_WORKSPACE_CONFIG=:4096:8 python3 -m pytest -q -p no:cacheprovider -n 4 \
        --device cuda tests/test_on_device.py tests/examples/test_sdxl_scripts.py -k "not fsdp and not two_process"
    # The largest batch each LoRA method fits on an 80 GB card (allocator capped at 78 GiB), shared base too.
    section 06-largest-batch 240 python3 benchmarks/gpu_sdxl.py --batches 16 32 64 --memory_cap_gib 78 --warmup 1 \
        --repeats 1 --methods ssd1b hyper_sd sim lightning mlcm
    section 07-shared-base 150 python3 benchmarks/gpu_sdxl.py --methods sim diffusion2gan --r1_approximate_sigma 0.1 \
        --batches 8 16 32 64 --memory_cap_gib 78 --shared_base --warmup 1 --repeats 1
    section 08-sd35-large 110 python3 benchmarks/gpu_flow.py --model sd35-large --batches 1 2 4 --warmup 1 \
        --repeats 1 --memory_cap_gib 78
    # Discriminator heads' overhead on the SDXL backbone (bf16, 128x128).
    section 09-discriminators 55 python3 benchmarks/discriminators.py --sdxl --device cuda --repeats 2 --warmup 1
    # The full-UNet students at batch 1.
    section 10-gpu-sdxl-full 100 python3 benchmarks/gpu_sdxl.py --full --batches 1 --warmup 1 --repeats 1 \
        --methods lightning hyper_sd diffusion2gan mlcm sim
fi
cat "$SUMMARY"
