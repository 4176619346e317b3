# Sourced at the start of every command on the GPU machine (see docs/benchmarks.md): installs the
# wheels the machine's image lacks (carried in .whl/) and points Python at this checkout.
# .whl/ holds ../shared/device-wheels/*.whl and python-isal's wheel for Python 3.12, which that folder
# lacks (`pip download isal --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 -d .whl`).
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1 \
  || echo "device_setup: error: pip could not install .whl/*.whl (is .whl carried?)" >&2
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
# Said here rather than as an ImportError minutes into a benchmark (session 17 lost a call to a missing isal).
python3 -c "
import importlib.util, sys
missing = [m for m in ('grain', 'nibabel', 'ml_collections', 'isal', 'pydicom', 'tqdm', 'matplotlib')
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit('device_setup: error: not importable here: ' + ', '.join(missing) + '; add their Python 3.12 wheels to .whl/')
"
