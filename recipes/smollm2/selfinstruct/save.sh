#!/usr/bin/env bash
# Keep a self-instruct run's stage files here (gzipped) so a later session resumes it:
#   bash recipes/smollm2/selfinstruct/save.sh runs/selfinstruct      # save
#   bash recipes/smollm2/selfinstruct/save.sh runs/selfinstruct --restore
set -euo pipefail
RUN=${1:?run folder}; HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$RUN"; RUN=$(cd "$RUN" && pwd)  # absolute: the copies below run inside $HERE
if [ "${2:-}" = "--restore" ]; then
  (cd "$HERE" && find . -name '*.jsonl.gz' | while read -r f; do
     mkdir -p "$RUN/$(dirname "$f")"; gunzip -c "$f" > "$RUN/${f%.gz}"; done)
  exit 0
fi
(cd "$RUN" && find . -name '*.jsonl' | while read -r f; do
   mkdir -p "$HERE/$(dirname "$f")"; gzip -9 -c "$f" > "$HERE/$f.gz"; done)
du -sh "$HERE"
