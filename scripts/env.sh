# Sourced by the project's commands: persistent Dagster home under data/, no hub access at run time.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export DAGSTER_HOME="$ROOT/data/dagster_home"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PATH="$ROOT/.venv/bin:$PATH"
