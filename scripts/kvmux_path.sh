# Sourced by the GPU scripts (run from the repository root, $PY set): if the kvmux package is not
# installed, import it from the source tree through a temporary folder of links.
if ! "$PY" -P -c "import kvmux.policies.base" 2>/dev/null; then
  SHIM="$(mktemp -d)"
  mkdir -p "$SHIM/kvmux"
  for file in kvmux/*.py; do ln -s "$PWD/$file" "$SHIM/kvmux/"; done
  for pkg in models policies server evals; do ln -s "$PWD/$pkg" "$SHIM/kvmux/$pkg"; done
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
