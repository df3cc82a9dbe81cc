#!/usr/bin/env bash
# install-flux.sh -- make a Flux (flux-core) available to executorkit's tests and benchmarks.
#
#   * a `flux` already on PATH (a site module, Spack, conda-forge's flux-core): nothing to do;
#   * otherwise build flux-core from its release archive into a prefix OUTSIDE the repository
#     and print nothing but progress; a prefix that already holds the archive's version is
#     reused, so CI's fresh clone on the same machine does not build again.
#
# Environment (all optional):
#   EXECUTORKIT_FLUX_ARCHIVE  the flux-core-X.Y.Z.tar.gz     (default ../shared/flux/flux-core-0.88.0.tar.gz)
#   EXECUTORKIT_FLUX_PREFIX   where to install              (default ~/.cache/executorkit/flux-core-X.Y.Z)
#   EXECUTORKIT_FLUX_PYTHON   interpreter to build against  (default: the base interpreter of .venv)
#   EXECUTORKIT_FLUX_VENV     a venv that should import the bindings (default .venv when present):
#                             gets cffi, pyyaml and ply and a .pth file naming the prefix's bindings
#   EXECUTORKIT_FLUX_JOBS     make -j                      (default: number of CPUs)
#
# The build needs a C toolchain and the Debian packages below; as root with apt-get they are
# installed, otherwise the script names the missing ones and stops. Flux's sources and binaries
# never enter the repository: the build happens in a temporary directory that is removed.
# Exit status: 0 = a flux is usable (on PATH or in the prefix), 1 = it is not.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[install-flux] $*"; }
die() { echo "[install-flux] ERROR: $*" >&2; exit 1; }

ARCHIVE=${EXECUTORKIT_FLUX_ARCHIVE:-../shared/flux/flux-core-0.88.0.tar.gz}
VERSION=$(basename "$ARCHIVE" | sed -n 's/^flux-core-\([0-9][0-9.]*\)\.tar\.gz$/\1/p')
PREFIX=${EXECUTORKIT_FLUX_PREFIX:-$HOME/.cache/executorkit/flux-core-${VERSION:-0.88.0}}
STAMP="$PREFIX/.executorkit-flux-version"
VENV=${EXECUTORKIT_FLUX_VENV:-.venv}
DEB_PACKAGES="autoconf automake libtool make gcc pkg-config libzmq3-dev libjansson-dev liblz4-dev
  libarchive-dev libhwloc-dev libsqlite3-dev uuid-dev libncurses-dev lua5.1 liblua5.1-dev lua-posix"

# --- the interpreter's side: bindings importable from the project's venv --------------------
link_venv() { # link_venv SITE_PACKAGES_OF_THE_BINDINGS
  local py="$VENV/bin/python" site
  [ -x "$py" ] || return 0
  if ! "$py" -c "import sys, os; sys.exit(not os.path.isdir('$1/flux'))" 2>/dev/null; then
    log "no bindings for $("$py" -c 'import sys; print("python%d.%d" % sys.version_info[:2])') in $1; $VENV left as is"
    return 0
  fi
  "$py" -m pip install -q "cffi>=1.15" "pyyaml>=6" "ply>=3.11"
  site=$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
  echo "$1" > "$site/executorkit-flux.pth"
  log "$VENV imports flux from $1"
}

bindings_of() { # bindings_of PREFIX -> the site-packages directory holding flux/ for .venv's Python
  local ver
  ver=$("${EXECUTORKIT_FLUX_PYTHON:-$VENV/bin/python}" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo 3)
  echo "$1/lib/python$ver/site-packages"
}

# --- nothing to build? ----------------------------------------------------------------------
if [ -z "${EXECUTORKIT_FLUX_PREFIX:-}" ] && command -v flux >/dev/null 2>&1 \
    && [ "$(command -v flux)" != "$PREFIX/bin/flux" ]; then
  log "using $(command -v flux) ($(flux version 2>/dev/null | sed -n 's/^commands:[[:space:]]*//p'))"
  exit 0
fi
[ -n "$VERSION" ] || die "cannot read a version from '$ARCHIVE' (expected flux-core-X.Y.Z.tar.gz)"

installed() { [ -x "$PREFIX/bin/flux" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$VERSION" ]; }

if installed; then
  log "flux-core $VERSION already in $PREFIX"
  link_venv "$(bindings_of "$PREFIX")"
  exit 0
fi
[ -f "$ARCHIVE" ] || die "no flux on PATH and no archive at '$ARCHIVE' (set EXECUTORKIT_FLUX_ARCHIVE)"
ARCHIVE=$(readlink -f "$ARCHIVE")

# Two checkouts may run this at once (CI and a developer): one builds, the other waits for it.
mkdir -p "$(dirname "$PREFIX")"
exec 9>"$PREFIX.lock"
flock 9
if installed; then
  log "flux-core $VERSION was installed into $PREFIX meanwhile"
  link_venv "$(bindings_of "$PREFIX")"
  exit 0
fi

# --- build packages -------------------------------------------------------------------------
missing=()
for p in $DEB_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get install ${missing[*]}"
    apt-get update -qq -o DPkg::Lock::Timeout=300
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
  else
    die "building flux-core needs these packages: ${missing[*]} (install them, or put a flux on PATH)"
  fi
fi

# --- build ----------------------------------------------------------------------------------
T0=$(date +%s)
BASE_PY=${EXECUTORKIT_FLUX_PYTHON:-}
if [ -z "$BASE_PY" ]; then
  if [ -x "$VENV/bin/python" ]; then
    BASE_PY=$("$VENV/bin/python" -c 'import sys; print(sys._base_executable)')
  else
    BASE_PY=$(command -v python3) || die "no python3 (set EXECUTORKIT_FLUX_PYTHON)"
  fi
fi
BUILD=$(mktemp -d "${TMPDIR:-/tmp}/executorkit-flux-build.XXXXXX")
trap 'rm -rf "$BUILD"' EXIT
rm -rf "$PREFIX"
mkdir -p "$PREFIX"
# Flux bakes its interpreter's path into every Python subcommand and broker module, and
# configure needs cffi, pyyaml and ply in it: give the prefix an interpreter of its own, so
# the installation does not depend on any project's venv.
log "interpreter for flux: venv of $BASE_PY in $PREFIX/python"
"$BASE_PY" -m venv "$PREFIX/python"
"$PREFIX/python/bin/python" -m pip install -q "cffi>=1.15" "pyyaml>=6" "ply>=3.11"

log "building flux-core $VERSION from $ARCHIVE in $BUILD"
tar -xzf "$ARCHIVE" -C "$BUILD"
SRC=$(find "$BUILD" -mindepth 1 -maxdepth 1 -type d | head -n 1)
export FLUX_VERSION=$VERSION   # the archive has no .git to derive it from
(
  cd "$SRC"
  ./autogen.sh > "$BUILD/autogen.log" 2>&1 || { tail -n 30 "$BUILD/autogen.log"; exit 1; }
  ./configure --prefix="$PREFIX" --disable-docs PYTHON="$PREFIX/python/bin/python" \
    > "$BUILD/configure.log" 2>&1 || { tail -n 40 "$BUILD/configure.log"; exit 1; }
  make -j"${EXECUTORKIT_FLUX_JOBS:-$(nproc)}" > "$BUILD/make.log" 2>&1 || { tail -n 40 "$BUILD/make.log"; exit 1; }
  make install > "$BUILD/install.log" 2>&1 || { tail -n 40 "$BUILD/install.log"; exit 1; }
) || { rm -rf "$PREFIX"; die "build failed"; }
"$PREFIX/bin/flux" version | grep -Eq "^commands:[[:space:]]+$VERSION\b" || die "the installed flux does not report $VERSION"
echo "$VERSION" > "$STAMP"
log "flux-core $VERSION installed into $PREFIX in $(( $(date +%s) - T0 )) s"
link_venv "$(bindings_of "$PREFIX")"
