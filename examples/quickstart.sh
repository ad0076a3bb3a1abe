#!/usr/bin/env bash
# The main job end to end on the embedded default (SQLite + a local directory under ~/.registry,
# or $REGISTRY_HOME): save the tutorial's model three ways, push, list, promote, pull, load, run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
cd "$work"

python "$here/save_tutorial_models.py"
registry push tutorial-full sample_model.pt                      # whole model (detected: full)
registry push tutorial sample_model_state.pt --arch tutorial_arch.json --description "tutorial MLP"
registry push tutorial-scripted model_scripted.pt                # TorchScript (detected)
registry list
registry list tutorial
v=$(registry --json show tutorial | python -c 'import json,sys; print(json.load(sys.stdin)["version"])')
registry promote tutorial --version "$v" --reason "quickstart"
registry show tutorial@production
registry pull tutorial@production -o pulled.pt
python "$here/load_and_run.py"
registry history tutorial
registry verify
echo "quickstart finished in $work"
