set -u
export PYTHONPATH=$PWD CUPY_CACHE_DIR=/tmp/cupy PYTHONUNBUFFERED=1
S=$OUT; mkdir -p /tmp/j
base() { env FLASHMLA_BACKEND_DECODE_DEFINES=-DDEPENDENTS_AFTER_WAIT=0 FLASHMLA_BACKEND_COMBINE_DEFINES=-DSPLITS_BEFORE_WAIT=0 "$@"; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 50 python benchmarks/check_decode_version.py --max-rows 512 > $S/check.log 2>&1; echo "new check rc $?: $(tail -1 $S/check.log)"
for r in 1 2; do
  for v in base new; do
    if [ $v = base ]; then pre=base; else pre=env; fi
    timeout 25 $pre python -m flashmla_backend.bench --no-peers --no-plots --rows latency --out /tmp/j/${v}_$r > $S/${v}_$r.md 2>&1
    echo "$v $r: $(grep -E '^\| latency|^Whole' $S/${v}_$r.md | cut -d'|' -f2,3 | tr '\n' ' ')"
  done
done
timeout 45 python -m pytest -q -p no:cacheprovider tests/test_gpu_decode.py tests/test_programmatic_launch.py > $S/tests.log 2>&1; echo "new tests: $(tail -1 $S/tests.log)"
