#!/usr/bin/env bash
# Bring the Qwen2.5-Coder-0.5B GGUF (491 MB) and the evaluation texts to a GPU machine that only
# receives this repository's working tree (at most 64 MiB per call) and has no network.
#
#   here:    bash benchmarks/gpu_transfer.sh prepare          # .xfer/qwen.part_00..07 (60 MiB each), .xcache/texts
#   device:  bash benchmarks/gpu_transfer.sh receive          # moves the carried .xfer/qwen.part_* to /tmp/xfer
#   device:  bash benchmarks/gpu_transfer.sh assemble         # last call: GGUF + texts into $CACHE, sha256 checked,
#                                                             # then converted once to safetensors (load_model)
#
# On the device the cache root is /tmp/bscache (export BLOCKSIEVE_CACHE=/tmp/bscache for the eval).
# .xfer/ and .xcache/ are listed in .git/info/exclude, so they travel only when a call's `carry` names them.
set -euo pipefail

GGUF_NAME=qwen2.5-coder-0.5b-instruct-q4.gguf
GGUF_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
PART_BYTES=$((60 * 1024 * 1024))
XFER=${XFER:-/tmp/xfer}
CACHE=${BLOCKSIEVE_CACHE:-/tmp/bscache}
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    src=${2:-$HOME/.cache/blocksieve}
    for d in /.xfer/ /.xcache/ /.whl/; do
        grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
    done
    rm -rf .xfer .xcache && mkdir -p .xfer .xcache/texts
    split -b "$PART_BYTES" -d -a 2 "$src/gguf/$GGUF_NAME" .xfer/qwen.part_
    cp "$src/texts/austen.txt" "$src/texts/kjv.txt" .xcache/texts/
    ls -l .xfer .xcache/texts
    echo "tree that travels without carry: $(git ls-files -co --exclude-standard -z | xargs -0 du -cb 2>/dev/null | tail -1)"
    ;;
receive)
    mkdir -p "$XFER"
    mv .xfer/qwen.part_* "$XFER"/
    echo "parts on the device: $(ls "$XFER" | tr '\n' ' ')($(du -cb "$XFER"/qwen.part_* | tail -1 | cut -f1) bytes)"
    ;;
assemble)
    mkdir -p "$XFER" "$CACHE/gguf" "$CACHE/texts"
    if compgen -G ".xfer/qwen.part_*" >/dev/null; then mv .xfer/qwen.part_* "$XFER"/; fi
    echo "parts: $(ls "$XFER" | tr '\n' ' ')"
    cat "$XFER"/qwen.part_* >"$CACHE/gguf/$GGUF_NAME.partial"
    got=$(sha256sum "$CACHE/gguf/$GGUF_NAME.partial" | cut -d' ' -f1)
    if [ "$got" != "$GGUF_SHA256" ]; then
        echo "GGUF sha256 $got != $GGUF_SHA256: a part is missing or broken (was the machine given back between calls?)" >&2
        exit 3
    fi
    mv "$CACHE/gguf/$GGUF_NAME.partial" "$CACHE/gguf/$GGUF_NAME" && rm -rf "$XFER"
    cp .xcache/texts/*.txt "$CACHE/texts/"
    BLOCKSIEVE_CACHE=$CACHE PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 python3 -c "
import time; t = time.time()
from blocksieve.eval.models import load_model
m, tok = load_model('qwen2.5-coder-0.5b')
print('converted in %.0f s:' % (time.time() - t), type(m).__name__, m.config.num_hidden_layers, 'layers', flush=True)"
    ls -l "$CACHE"/*
    ;;
*)
    echo "usage: $0 prepare [CACHE_ROOT] | receive | assemble" >&2
    exit 2
    ;;
esac
