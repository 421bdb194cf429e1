# shellcheck shell=bash
# Sourced by scripts/test, scripts/book and scripts/run_notebooks: makes sure the repository's
# virtual environment .venv exists and holds this package with its [test,book] extras, then puts
# it first on PATH. Idempotent: a stamp file named after the hash of pyproject.toml and
# ci/constraints.txt skips the install when nothing changed (an edit to median_sgd/ needs no
# reinstall: the package is installed editable).
#
#   PYTHON=python3.11 scripts/test     # choose the interpreter the venv is made from
#   MEDIAN_SGD_VENV=/path/to/venv ...  # use another venv location
#
# torch is installed first and only when the venv cannot import it: the documented CI pin is
# torch==2.13.0 (a CPU wheel on CI); a torch you installed into the venv yourself is kept.

MEDIAN_SGD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MEDIAN_SGD_TORCH_SPEC="torch==2.13.0"

_median_sgd_venv() {
    local root="$MEDIAN_SGD_ROOT"
    local venv="${MEDIAN_SGD_VENV:-$root/.venv}"
    local python="${PYTHON:-python3}"

    if [ ! -x "$venv/bin/python" ]; then
        if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "[venv] error: need Python >= 3.11 (found: $("$python" --version 2>&1))." >&2
            echo "[venv]        set PYTHON=/path/to/python3.11 or newer." >&2
            return 1
        fi
        echo "[venv] creating $venv with $("$python" --version 2>&1)"
        "$python" -m venv "$venv" || return 1
    fi

    local hash stamp
    hash="$(cat "$root/pyproject.toml" "$root/ci/constraints.txt" | sha256sum | cut -c1-16)"
    stamp="$venv/.installed-$hash"
    if [ -f "$stamp" ]; then
        echo "[venv] $venv is up to date ($(basename "$stamp"))"
    else
        local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
        if "$venv/bin/python" -c 'import torch' 2>/dev/null; then
            echo "[venv] keeping installed torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
        else
            echo "[venv] installing $MEDIAN_SGD_TORCH_SPEC (first, so pip does not choose a torch itself)"
            "${pip[@]}" install -c "$root/ci/constraints.txt" "$MEDIAN_SGD_TORCH_SPEC" || return 1
        fi
        echo "[venv] installing median-sgd[test,book] (editable) with ci/constraints.txt"
        "${pip[@]}" install -c "$root/ci/constraints.txt" -e "$root[test,book]" || return 1
        rm -f "$venv"/.installed-*
        touch "$stamp"
        echo "[venv] done: $venv"
    fi

    export VIRTUAL_ENV="$venv"
    export PATH="$venv/bin:$PATH"
    hash -r 2>/dev/null || true
}

_median_sgd_venv
