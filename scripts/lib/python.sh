# shellcheck shell=bash
# The project venv and the ONNX Runtime library inside it.
# Needs common.sh sourced.
#
# Sets: MG_VENV (mg_python_setup); exports ORT_DYLIB_PATH (mg_export_ort_dylib_path).

# Must match the onnxruntime pin in scripts/requirements.txt.
MG_ORT_VERSION=1.31.1
MG_VENV=

# Creates or reuses the venv through scripts/setup-python.sh (which prints the venv path).
mg_python_setup() {
    local script="$MG_ROOT/scripts/setup-python.sh"
    [[ -f $script ]] || mg_die "missing $script"
    mg_log "Python: preparing the venv (scripts/setup-python.sh)"
    MG_VENV=$(mg_lock python bash "$script") || mg_die "scripts/setup-python.sh failed"
    MG_VENV=$(tail -n 1 <<<"$MG_VENV")
    [[ -x $MG_VENV/bin/python ]] || mg_die "scripts/setup-python.sh printed '$MG_VENV', which has no bin/python"
}

# Exports ORT_DYLIB_PATH as the libonnxruntime.so of the venv's onnxruntime wheel.
mg_export_ort_dylib_path() {
    local pkg lib
    # find_spec locates the package without importing (and so loading) the library.
    pkg=$("$MG_VENV/bin/python" -c '
import importlib.util, sys
spec = importlib.util.find_spec("onnxruntime")
if spec is None or not spec.submodule_search_locations:
    sys.exit("onnxruntime is not installed")
print(list(spec.submodule_search_locations)[0])
') || mg_die "onnxruntime is not installed in $MG_VENV (see scripts/requirements.txt)"
    lib="$pkg/capi/libonnxruntime.so.$MG_ORT_VERSION"
    [[ -f $lib ]] || mg_die "$lib not found: the venv must hold onnxruntime==$MG_ORT_VERSION"
    export ORT_DYLIB_PATH=$lib
    mg_log "ONNX Runtime: ORT_DYLIB_PATH=$lib"
}
