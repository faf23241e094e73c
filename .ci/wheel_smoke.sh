#!/usr/bin/env bash
# CI: the built package works anywhere. Build the wheel from this checkout, install it (not
# editable) into a fresh venv, and in an empty directory, with no repository file in reach, run
# the main job, a search by the Python API with a shipped space named by its name, and an
# import -> prune -> quantize -> search -> benchmark chain on a model class of the user's own.
# Everything (the source copy, the build, the venv, the runs) lives in one temporary
# directory, removed at the end (KEEP_SMOKE=1 keeps it). Stops at the first failing step and
# names it. Usage: .ci/wheel_smoke.sh   (PYTHON=python3.11 to choose the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/mcp-wheel-smoke.XXXXXX")"
STEP="setup"
START=$SECONDS

step() {
    STEP="$1"
    echo "== [$((SECONDS - START))s] $STEP"
}
on_error() {
    echo "wheel smoke: FAILED at step '$STEP' after $((SECONDS - START))s (exit $1)" >&2
}
cleanup() {
    if [ "${KEEP_SMOKE:-0}" = 1 ]; then echo "wheel smoke: kept $TMP"; else rm -rf "$TMP"; fi
}
trap 'on_error $?' ERR
trap cleanup EXIT

step "copy the source (tracked and unignored files; the build writes build/ and *.egg-info there, not in the repo)"
mkdir -p "$TMP/src" "$TMP/dist" "$TMP/work"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$ROOT" && while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done) \
    | tar -C "$ROOT" --null -T - -cf - | tar -C "$TMP/src" -xf -

step "build the wheel (pip wheel, setuptools in an isolated build environment)"
"$PYTHON" -m pip wheel --quiet --no-deps -w "$TMP/dist" "$TMP/src"
WHEEL="$(ls "$TMP"/dist/mcp_pipeline-*.whl)"
echo "built $(basename "$WHEEL")"

step "the wheel carries the shipped search spaces"
"$PYTHON" - "$WHEEL" "$ROOT" <<'EOF'
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
shipped = sorted(p.stem for p in (Path(sys.argv[2]) / "mcp/tuner/spaces").glob("*.yaml"))
assert len(shipped) >= 5, shipped
missing = [f"mcp/tuner/spaces/{n}.yaml" for n in shipped if f"mcp/tuner/spaces/{n}.yaml" not in names]
assert not missing, f"the wheel lacks {missing}"
EOF

step "install the wheel (not editable) into a fresh venv"
"$PYTHON" -m venv "$TMP/venv"
"$TMP/venv/bin/python" -m pip install --quiet --upgrade pip
"$TMP/venv/bin/python" -m pip install --quiet "$WHEEL"

# From here on: the fresh venv, an empty directory, nothing of the checkout in reach
export PATH="$TMP/venv/bin:$PATH"
unset PYTHONPATH VIRTUAL_ENV MLFLOW_EXPERIMENT_NAME MLFLOW_EXPERIMENT_ID
export MLFLOW_TRACKING_URI="sqlite:///$TMP/work/mlflow.db"
export MCP_CACHE_DIR="$TMP/cache" MCP_DEPLOY_TIMING_S=0.05 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$TMP/work"

step "import mcp from the installed package"
python - "$ROOT" <<'EOF'
import sys
from pathlib import Path
import mcp
from mcp.tuner.space import SPACES_DIR, space_names
root, where = Path(sys.argv[1]).resolve(), Path(mcp.__file__).resolve()
assert root not in where.parents, f"mcp is imported from the checkout: {where}"
assert "site-packages" in where.parts, where
shipped = sorted(p.stem for p in (root / "mcp/tuner/spaces").glob("*.yaml"))
assert space_names() == shipped, (space_names(), shipped)
print("mcp", mcp.__version__, "from", where.parent, "; spaces:", ", ".join(space_names()))
EOF

step "mcp pipeline (the main job, short)"
mcp pipeline --epochs 3 --prune-epochs 2 --quantize-epochs 1 --trials 2 --final-epochs 1 --seconds 0.2

step "the README's \"Your own model\": its files and its commands exactly as printed (the search cut to 3 trials), on generated IDX files"
python "$ROOT/.ci/readme_own_model.py" "$ROOT/README.md" --trials 3 --api api_example.py
bash own_model.sh

step "the README's Python API example, as printed (digits)"
python api_example.py

step "mcp.search(..., space=...) names: a shipped space's name works, an unknown one is one clear error"
python - <<'EOF'
import mcp
from mcp.data import load_dataset, make_loaders
from mcp.models import create_model

splits = load_dataset("digits")
data = make_loaders(splits, 64)
model = create_model("lenet300_100", splits.num_classes, splits.input_shape)
budget = 0.3 * 4 * sum(p.numel() for p in model.parameters())
found = mcp.search(model, data, space="default", budget_bytes=budget, trials=1, device="cpu")
assert len(found.trials) == 1 and found.winner is not None, found.trials
print("api search: winner", found.winner.number, f"{found.metrics['size_bytes_compressed']:.0f} B of {budget:.0f} B")
try:
    mcp.search(model, data, space="nosuch", budget_bytes=budget, trials=1, device="cpu")
except mcp.ConfigError as exc:
    assert "nosuch" in str(exc) and "structured" in str(exc), exc
else:
    raise AssertionError("an unknown space name was accepted")
EOF

step "an unknown --space is one error line, exit 2"
out="$(mcp search --model-uri models:/mynet-idx@baseline --space nosuch 2>&1)" && rc=0 || rc=$?
echo "$out"
errors="$(printf '%s\n' "$out" | grep '^error:' || true)"  # (MLflow may log INFO lines too)
if ! { [ "$rc" = 2 ] && [ "$(printf '%s\n' "$errors" | wc -l)" = 1 ] && [[ "$errors" == *"'nosuch'"*structured* ]]; }; then
    echo "expected one 'error:' line naming 'nosuch' and the shipped spaces, and exit 2 (got exit $rc)" >&2
    false
fi

STEP="done"
echo "wheel smoke: OK in $((SECONDS - START))s"
