#!/usr/bin/env bash
# Set up, then run the built-in experiment suite (pass --quick for the smaller profile).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/weightweaving suite "$@"
