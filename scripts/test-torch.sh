#!/usr/bin/env bash
# The torch version matrix: fxfuse's test suite and `fxfuse demo` on each supported release.
#
# Usage: scripts/test-torch.sh [VERSION ...]      (default: every release of DESIGN §9)
#
# Each release gets its own virtual environment with that torch, the triton it pins,
# and fxfuse installed in editable mode from this checkout with its test extras. The
# environments, uv's download cache and the logs live outside the repository, so a
# re-run reuses them (no re-download, no re-create) and a clone carries none of them.
# Prints one line per release as it finishes, then a markdown table for docs/compat.md;
# exits non-zero if any release fails.
#
# Environment:
#   FXFUSE_MATRIX_DIR         where venvs, cache and logs go (default ~/.cache/fxfuse-torch-matrix)
#   FXFUSE_MATRIX_PYTEST_ARGS extra pytest arguments, e.g. "-k passes" (default: none)
#   FXFUSE_MATRIX_FIND_LINKS  local wheel directories, space-separated (default: pip's find-links);
#                             a release found there is taken from there, so a CPU wheel
#                             provided locally (torch 2.13.0 on the CI machines) wins over
#                             the package index's CUDA build
#   FXFUSE_MATRIX_TIMEOUT     seconds the test suite of one release may take (default 3600;
#                             each demo gets a third of it)
#   PYTHON                    the interpreter the venvs are made from (default python3)
#   UV                        a uv binary to use (default: uv on PATH, else one installed
#                             into $FXFUSE_MATRIX_DIR/uv-tool)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEFAULT_VERSIONS=(2.9.1 2.10.0 2.11.0 2.12.1 2.13.0 2.14.1 2.15.0)
DEMO_LAYERS=3
DIR=${FXFUSE_MATRIX_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fxfuse-torch-matrix}
PYTHON=${PYTHON:-python3}
read -r -a PYTEST_EXTRA <<<"${FXFUSE_MATRIX_PYTEST_ARGS:-}"
TIMEOUT=${FXFUSE_MATRIX_TIMEOUT:-3600}
# Each release runs in its own venv only: nothing of the caller's environment may leak in.
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV

# uv's cache hard-links identical files into every venv: the nvidia-* wheels that
# several releases share are stored once instead of once per venv.
export UV_CACHE_DIR=${UV_CACHE_DIR:-$DIR/uv-cache}
export UV_LINK_MODE=${UV_LINK_MODE:-hardlink}
mkdir -p "$DIR/venvs" "$DIR/logs" "$UV_CACHE_DIR"

log() { printf '%s\n' "$*" >&2; }

find_uv() {
  if [ -n "${UV:-}" ]; then
    echo "$UV"
  elif command -v uv >/dev/null 2>&1; then
    command -v uv
  else
    if [ ! -x "$DIR/uv-tool/bin/uv" ]; then
      log "installing uv into $DIR/uv-tool"
      "$PYTHON" -m venv "$DIR/uv-tool"
      "$DIR/uv-tool/bin/python" -m pip install -q uv
    fi
    echo "$DIR/uv-tool/bin/uv"
  fi
}

# pip's find-links (uv does not read pip's configuration): where local wheels lie.
find_links_args() {
  local links=${FXFUSE_MATRIX_FIND_LINKS-${PIP_FIND_LINKS:-$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)}}
  local l
  for l in $links; do
    printf -- '--find-links\n%s\n' "$l"
  done
}

# The triton a release pins. The CUDA wheels require it themselves; a CPU wheel does
# not, so take the pin of the same release's CUDA wheel from the index (once: cached
# in the venv). Without it the test extras would pair a CPU torch with the newest
# triton, one its Inductor was never released with.
triton_pin() {
  local venv=$1 version=$2 pin_file=$1/.fxfuse-triton-pin
  if "$venv/bin/python" - <<'EOF'
import importlib.metadata as md, re, sys
reqs = md.requires("torch") or []
sys.exit(0 if any(re.match(r"triton\b", r) and "extra ==" not in r for r in reqs) else 1)
EOF
  then
    return 0  # pinned by torch itself
  fi
  if [ ! -s "$pin_file" ]; then
    echo "torch==$version" | "$UV_BIN" pip compile -q --no-header --no-annotate \
      --python-version "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" \
      --python-platform "$(uname -m)-manylinux_2_28" - | grep -E '^triton==' >"$pin_file.tmp" || return
    mv "$pin_file.tmp" "$pin_file"
  fi
  cat "$pin_file"
}

# Make (or reuse) the venv of one release and install this checkout into it. Each
# step returns on failure itself: the caller tests this function in an `if`, where
# bash ignores `set -e`.
prepare() {
  local version=$1 venv=$DIR/venvs/torch-$1 pin
  local -a links
  mapfile -t links < <(find_links_args)
  if [ ! -x "$venv/bin/python" ]; then
    # --seed: pip and setuptools, as `python -m venv` gives; torch 2.9's Inductor
    # imports setuptools to build its C++ kernels without declaring it.
    "$UV_BIN" venv -q --seed --python "$PYTHON" "$venv" || return
  fi
  if [ ! -f "$venv/.fxfuse-torch-$version" ]; then
    "$UV_BIN" pip install -q --python "$venv/bin/python" ${links[@]+"${links[@]}"} "torch==$version" || return
    touch "$venv/.fxfuse-torch-$version"
  fi
  pin=$(triton_pin "$venv" "$version") || return
  # torch is restated so that resolving the extras can never move it; all of it is
  # installed already after the first run, so this only re-links the editable fxfuse.
  "$UV_BIN" pip install -q --python "$venv/bin/python" ${links[@]+"${links[@]}"} \
    "torch==$version" ${pin:+"$pin"} -e "$ROOT[test]" || return
  "$venv/bin/python" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')"
}

# pytest's junit report, as "passed failed skipped" (errors count as failed).
junit_counts() {
  "$PYTHON" - "$1" <<'EOF'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 0 0"); sys.exit()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
n = lambda k: sum(int(s.get(k, 0)) for s in suites)
failed = n("failures") + n("errors")
print(n("tests") - failed - n("skipped"), failed, n("skipped"))
EOF
}

# The demo's match counts per pass ("act=3 attn=3 rms=6"), then "ok" (the counts
# DESIGN §6 promises, identical tokens) or "MISMATCH", from its --json output.
demo_summary() {
  "$PYTHON" - "$1" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    print("no result"); sys.exit()
got = {p: sum(d["match_table"].get(p, {}).values()) for p in d["expected_matches"]}
counts = " ".join(f"{p.split('_')[0]}={got[p]}" for p in sorted(got))
ok = got == d["expected_matches"] and d["tokens_equal"]
print(f"{counts} {'ok' if ok else 'MISMATCH'}")
EOF
}

fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }

ROWS=()
FAILED=()

run_release() {
  local version=$1 venv=$DIR/venvs/torch-$1 logf=$DIR/logs/torch-$1.log
  local start=$SECONDS status=ok env_line counts demos="" quant
  : >"$logf"
  log "== torch $version (log: $logf)"
  if ! env_line=$(prepare "$version" 2>>"$logf" | tail -1); then
    status="setup failed"
    ROWS+=("| $version | - | - | - | - | - | $(fmt_time $((SECONDS - start))) | $status |")
    FAILED+=("$version")
    log "torch $version: $status (see $logf)"
    return
  fi
  echo "$env_line" >>"$logf"

  local junit=$DIR/logs/torch-$version.junit.xml
  rm -f "$junit"
  if ! (cd "$ROOT" && timeout "$TIMEOUT" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
        --junitxml="$junit" ${PYTEST_EXTRA[@]+"${PYTEST_EXTRA[@]}"}) >>"$logf" 2>&1; then
    status="tests failed"
  fi
  counts=$(junit_counts "$junit")

  for quant in fp8 nvfp4; do
    local json=$DIR/logs/torch-$version.demo-$quant.json
    rm -f "$json"
    echo "== fxfuse demo --layers $DEMO_LAYERS --quant $quant" >>"$logf"
    if ! (cd "$ROOT" && timeout $((TIMEOUT / 3)) "$venv/bin/fxfuse" demo --layers "$DEMO_LAYERS" \
          --quant "$quant" --json "$json") >>"$logf" 2>&1; then
      [ "$status" = ok ] && status="demo failed"
    fi
    demos+="${demos:+; }$quant $(demo_summary "$json")"
  done

  local passed failed skipped
  read -r passed failed skipped <<<"$counts"
  local elapsed
  elapsed=$(fmt_time $((SECONDS - start)))
  ROWS+=("| $version | ${env_line#torch } | $passed | $failed | $skipped | $demos | $elapsed | $status |")
  [ "$status" = ok ] || FAILED+=("$version")
  printf 'torch %-7s %-40s passed %4s  failed %3s  skipped %3s  demo %s  %s  %s\n' \
    "$version" "($env_line)" "$passed" "$failed" "$skipped" "$demos" "$elapsed" "$status"
}

main() {
  local versions=("$@")
  [ ${#versions[@]} -gt 0 ] || versions=("${DEFAULT_VERSIONS[@]}")
  local v
  for v in "${versions[@]}"; do
    [[ $v =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { log "not a torch release: '$v' (expected e.g. 2.13.0)"; exit 2; }
  done
  UV_BIN=$(find_uv)
  log "fxfuse torch matrix: ${versions[*]}; venvs and logs under $DIR"

  # One release at a time: each suite uses every core, and the logs stay readable.
  for v in "${versions[@]}"; do
    run_release "$v"
  done

  echo
  echo "$(date +%F), $(uname -m), $(nproc) cores, Python $("$PYTHON" -c 'import platform; print(platform.python_version())')," \
       "fxfuse demo --layers $DEMO_LAYERS (expected: act=$DEMO_LAYERS attn=$DEMO_LAYERS rms=$((2 * DEMO_LAYERS)), identical tokens)"
  echo
  echo "| torch | build | passed | failed | skipped | demo matches | time | result |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  if [ ${#FAILED[@]} -gt 0 ]; then
    log "failed: ${FAILED[*]} (logs in $DIR/logs)"
    exit 1
  fi
}

main "$@"
