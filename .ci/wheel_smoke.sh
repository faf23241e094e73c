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
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
missing = [f"mcp/search/spaces/{n}.yaml" for n in ("default", "structured", "lenet", "resnet", "resnet_latency")
           if f"mcp/search/spaces/{n}.yaml" not in names]
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
from mcp.search.space import SPACES_DIR, space_names
root, where = Path(sys.argv[1]).resolve(), Path(mcp.__file__).resolve()
assert root not in where.parents, f"mcp is imported from the checkout: {where}"
assert "site-packages" in where.parts, where
assert space_names() == ["default", "lenet", "resnet", "resnet_latency", "structured"], space_names()
print("mcp", mcp.__version__, "from", where.parent, "; spaces:", ", ".join(space_names()))
EOF

step "mcp pipeline (the main job, short)"
mcp pipeline --epochs 3 --prune-epochs 2 --quantize-epochs 1 --trials 2 --final-epochs 1 --seconds 0.2

step "mcp.search(..., space=\"default\") by the Python API on digits"
python - <<'EOF'
import mcp
from mcp.data import load_dataset, make_loaders
from mcp.models import create_model
from mcp.search.objective import trial_table

splits = load_dataset("digits")
data = make_loaders(splits, 64)
model = create_model("lenet300_100", splits.num_classes, splits.input_shape)
budget = 0.3 * 4 * sum(p.numel() for p in model.parameters())
study = mcp.search(model, data, space="default", budget_bytes=budget, trials=1, device="cpu")
rows = trial_table(study, "compressed")
assert len(rows) == 1, rows
print("api search:", rows[0]["state"], f"{rows[0]['size_bytes']:.0f} B of a {budget:.0f} B budget")
try:
    mcp.search(model, data, space="nosuch", budget_bytes=budget, trials=1, device="cpu")
except mcp.ConfigError as exc:
    assert "nosuch" in str(exc) and "structured" in str(exc), exc
else:
    raise AssertionError("an unknown space name was accepted")
EOF

step "train a model class of the user's own (mynet.py) in plain PyTorch"
cat > mynet.py <<'EOF'
import torch.nn as nn


class MyNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(),
                                        nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))
EOF
python - <<'EOF'
import torch
from mcp.data import load_dataset, make_loaders
from mynet import MyNet

torch.manual_seed(0)
train, _, test = make_loaders(load_dataset("digits"), 32)
model = MyNet()
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _ in range(3):
    for x, y in train:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
model.eval()
with torch.no_grad():
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test)
print(f"mynet test accuracy {correct / len(test.dataset):.3f}")
torch.save(model.state_dict(), "mynet.pt")
EOF

step "mcp import --module mynet:MyNet"
mcp import --module mynet:MyNet --weights mynet.pt --name mynet

step "mcp prune (structured) the imported model"
mcp prune --model-uri models:/mynet-digits@baseline --granularity structured --sparsity 0.5 --epochs 1

step "mcp quantize (ptq_int8) the imported model"
mcp quantize --model-uri models:/mynet-digits@baseline --method ptq_int8

step "mcp search the imported model (--space structured, a shipped space by its name)"
mcp search --model-uri models:/mynet-digits@baseline --space structured --budget-ratio 0.3 --trials 2

step "mcp benchmark every version of mynet-digits"
mcp benchmark --registered-model mynet-digits --seconds 0.2 --iters 20 --warmup 2

step "an unknown --space is one error line, exit 2"
out="$(mcp search --model-uri models:/mynet-digits@baseline --space nosuch 2>&1)" && rc=0 || rc=$?
echo "$out"
errors="$(printf '%s\n' "$out" | grep '^error:' || true)"  # (MLflow may log INFO lines too)
if ! { [ "$rc" = 2 ] && [ "$(printf '%s\n' "$errors" | wc -l)" = 1 ] && [[ "$errors" == *"'nosuch'"*structured* ]]; }; then
    echo "expected one 'error:' line naming 'nosuch' and the shipped spaces, and exit 2 (got exit $rc)" >&2
    false
fi

STEP="done"
echo "wheel smoke: OK in $((SECONDS - START))s"
