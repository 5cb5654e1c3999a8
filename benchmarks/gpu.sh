#!/usr/bin/env bash
# The prepared GPU run (benchmarks/gpu.py): every GPU figure, in order of value, in under 9 minutes.
#   python benchmarks/gpu.py --make-kit     # here, first: .gpu-kit/ with the tokenizer and text
#   bash benchmarks/gpu.sh                  # on the GPU machine, from a checkout with .gpu-kit/ carried beside it
#   bash benchmarks/gpu.sh --dry-run        # tiny shapes on the CPU (CI's smoke test)
# cntinit need not be installed there: the checkout goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
# a read-only site-packages has no .pyc files: each fresh process would compile transformers' and torch's
# sources again (13 s a process on the first H100 lease); one writable cache compiles them once. An environment
# that sets PYTHONDONTWRITEBYTECODE (this project's machines do) would leave the cache empty and compile in every process
export PYTHONPYCACHEPREFIX="${PYTHONPYCACHEPREFIX:-${TMPDIR:-/tmp}/cntinit-pycache}"
unset PYTHONDONTWRITEBYTECODE
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu.py "$@"
