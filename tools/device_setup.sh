# Sourced at the start of every command on the GPU machine (see docs/benchmarks.md): installs the
# wheels the machine's image lacks (carried in .whl/) and points Python at this checkout.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
