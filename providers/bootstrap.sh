#!/usr/bin/env bash
# tunefleet's bootstrap on a rented machine: install the exact tunefleet the daemon runs, then run
# the payload. One script for every remote provider (Vast.ai runs it as the container's command,
# SkyPilot as the task's `run`); providers/remote.py fills the environment it reads:
#
#   TUNEFLEET_WHEEL_URL, TUNEFLEET_WHEEL_SHA256, TUNEFLEET_WHEEL_NAME
#       the daemon's own tunefleet, built as a wheel and uploaded to the job's store (a presigned
#       URL, or a file:// URL); its sha256 is checked before pip sees it
#   TUNEFLEET_CONSTRAINTS_URL, TUNEFLEET_CONSTRAINTS_SHA256
#       the daemon's pins (constraints.txt without torch: the image's PyTorch/CUDA build is kept)
#   TUNEFLEET_PACKAGE
#       instead of the wheel: a released version from the package index (config: remote_package)
#   TUNEFLEET_REPORT_URL  a presigned PUT of the job's progress.json, to report a setup failure
#   TUNEFLEET_PYTHON    the image's Python (default: python3, else python)
#   TUNEFLEET_EXTRAS    extras to install (default: train,s3)
#
# Exit codes: whatever the payload exits with (jobs/exits.py), or 3 (EXIT_SETUP_FAILED: this
# machine could not be set up; the daemon tries another) when a download, a checksum or pip fails.
set -uo pipefail

say() { echo "[tunefleet-bootstrap] $*" >&2; }
# A setup failure is reported where a payload reports its exit (the job's progress.json), through
# the presigned TUNEFLEET_REPORT_URL: the daemon then knows this machine could not run it (exit 3,
# tried elsewhere) instead of seeing a container that exited without a word.
report() {
  [ -n "${TUNEFLEET_REPORT_URL:-}" ] || return 0
  "${PY:-python3}" - "$1" <<'PYEOF' >/dev/null 2>&1 || true
import json, os, sys, time, urllib.request
doc = {"attempt_id": os.environ.get("TUNEFLEET_ATTEMPT_ID"), "state": "failed", "exit_code": 3, "step": 0,
       "error": "setup failed: " + sys.argv[1][-500:], "updated_at": time.time()}
req = urllib.request.Request(os.environ["TUNEFLEET_REPORT_URL"], data=json.dumps(doc).encode(), method="PUT",
                             headers={"Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=30).close()
PYEOF
}
fail() { say "setup failed: $*"; report "$*"; exit 3; }

PY="${TUNEFLEET_PYTHON:-}"
if [ -z "$PY" ]; then
  if command -v python3 >/dev/null 2>&1; then PY=python3; else PY=python; fi
fi
command -v "$PY" >/dev/null 2>&1 || fail "no Python on this image ($PY)"
EXTRAS="${TUNEFLEET_EXTRAS:-train,s3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/tunefleet-bootstrap.XXXXXX")" || fail "cannot create a work folder"

# fetch URL SHA256 DEST: download with the image's Python (no curl needed), verify, or fail
fetch() {
  "$PY" - "$1" "$2" "$3" <<'PYEOF' || fail "could not fetch $(basename "$3")"
import hashlib, shutil, sys, time, urllib.request
url, want, dest = sys.argv[1:4]
for attempt in range(5):
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
        break
    except OSError as exc:
        if attempt == 4:
            sys.exit(f"download failed: {type(exc).__name__}")
        time.sleep(2 ** attempt)
h = hashlib.sha256()
with open(dest, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
if h.hexdigest() != want:
    sys.exit(f"sha256 mismatch: got {h.hexdigest()[:16]}..., expected {want[:16]}...")
PYEOF
}

if [ -n "${TUNEFLEET_PACKAGE:-}" ]; then
  say "installing $TUNEFLEET_PACKAGE from the package index"
  "$PY" -m pip install --no-cache-dir --quiet "$TUNEFLEET_PACKAGE" || fail "pip could not install $TUNEFLEET_PACKAGE"
else
  : "${TUNEFLEET_WHEEL_URL:?}" "${TUNEFLEET_WHEEL_SHA256:?}" "${TUNEFLEET_WHEEL_NAME:?}"
  case "$TUNEFLEET_WHEEL_NAME" in
    tunefleet-*.whl) ;;
    *) fail "unexpected wheel name" ;;
  esac
  fetch "$TUNEFLEET_WHEEL_URL" "$TUNEFLEET_WHEEL_SHA256" "$WORK/$TUNEFLEET_WHEEL_NAME"
  PINS=()
  if [ -n "${TUNEFLEET_CONSTRAINTS_URL:-}" ]; then
    fetch "$TUNEFLEET_CONSTRAINTS_URL" "${TUNEFLEET_CONSTRAINTS_SHA256:?}" "$WORK/constraints.txt"
    PINS=(-c "$WORK/constraints.txt")
  fi
  say "installing $TUNEFLEET_WHEEL_NAME [$EXTRAS] on $("$PY" -V 2>&1)"
  "$PY" -m pip install --no-cache-dir --quiet "${PINS[@]}" "tunefleet[$EXTRAS] @ file://$WORK/$TUNEFLEET_WHEEL_NAME" \
    || fail "pip could not install $TUNEFLEET_WHEEL_NAME"
fi

cd "$WORK" || fail "cannot enter $WORK"
say "starting the payload"
exec "$PY" -m jobs.train
