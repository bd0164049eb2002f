#!/usr/bin/env bash
# Install the headless browser the chat-page test drives: Debian's chromium
# package (/usr/bin/chromium), driven from Python by playwright (a dev extra of
# the project, installed by scripts/setup.sh). Playwright's own browser
# download is not used. Idempotent: does nothing when /usr/bin/chromium exists.
#   LLM_STREAM_CHROMIUM  path of an existing Chromium to use instead
set -euo pipefail

log() { printf '[install_browser] %s\n' "$*" >&2; }

chromium=${LLM_STREAM_CHROMIUM:-/usr/bin/chromium}
if [ -x "$chromium" ]; then
  log "found $chromium ($("$chromium" --version 2>/dev/null || echo 'version unknown'))"
  exit 0
fi
if [ -n "${LLM_STREAM_CHROMIUM:-}" ]; then
  log "LLM_STREAM_CHROMIUM=$chromium is not an executable file"
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "no apt-get here: install Chromium yourself and set LLM_STREAM_CHROMIUM to its path"
  exit 1
fi

as_root=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    log "installing chromium needs root: run 'apt-get install -y chromium' as root, or install sudo"
    exit 1
  fi
  as_root=(sudo --non-interactive)
fi

# fonts-liberation is only recommended by chromium, but pages (and screenshots)
# need a real sans-serif font; the other recommendations are for desktops.
log "installing Debian's chromium package (about 2 minutes)"
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
log "installed $("$chromium" --version)"
