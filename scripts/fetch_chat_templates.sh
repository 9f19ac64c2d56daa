#!/usr/bin/env bash
# Fetches the real Hugging Face chat templates that tests/python/test_chat_templates.py renders
# into a cache (default ~/.cache/edpo/chat-templates, or $EDPO_CHAT_TEMPLATES), checking the
# sha256 of every download and of every file kept. The templates are never copied into this
# repository; the test reads them from the cache.
#
#   chat-template-automap.ts  npm @huggingface/ollama-utils@0.0.18 (MIT, Hugging Face),
#                             package/src/chat-template-automap.ts: the tokenizer.chat_template
#                             of 97 public GGUF models (OLLAMA_CHAT_TEMPLATE_MAPPING).
#   command-r7b.jinja         PyPI sdist llama-cpp-python==0.3.16, vendor/llama.cpp/models/
#                             templates/CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja,
#                             the one public template found whose plain-chat output depends on
#                             lstrip_blocks. The 50 MB sdist is downloaded once and deleted; only
#                             the template (13 KB) stays.
#
# Idempotent: with both files present and intact it only checks their hashes.
set -euo pipefail

CACHE="${EDPO_CHAT_TEMPLATES:-$HOME/.cache/edpo/chat-templates}"
VENV="${EDPO_VENV:-$HOME/.cache/edpo/venv}"

NPM_SPEC="@huggingface/ollama-utils@0.0.18"
NPM_TGZ="huggingface-ollama-utils-0.0.18.tgz"
NPM_TGZ_SHA=3d8beba35ea5d634970e29090ab45234e54a3db8d9263cf72e0031c1cc44f8d5
AUTOMAP_SHA=8665c3d91f09be3e289ece2d0b787b458b0b429b3bf5b0970cc5c229772c2447

SDIST="llama_cpp_python-0.3.16.tar.gz"
SDIST_SHA=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6
SDIST_MEMBER="llama_cpp_python-0.3.16/vendor/llama.cpp/models/templates/CohereForAI-c4ai-command-r7b-12-2024-tool_use.jinja"
COMMAND_R7B_SHA=0c3f266d86f93a1f50f1573648ba005cb9691ff176c2cfd7ca1a0a33fd7023ec

die() {
    echo "fetch_chat_templates: $*" >&2
    exit 1
}

# intact FILE SHA: the file exists and has that sha256.
intact() {
    [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$2" ]]
}

check() {
    intact "$1" "$2" || die "$1: sha256 is $(sha256sum "$1" | cut -d' ' -f1), expected $2"
}

mkdir -p "$CACHE"
tmp="$(mktemp -d "$CACHE/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

if ! intact "$CACHE/chat-template-automap.ts" "$AUTOMAP_SHA"; then
    command -v npm >/dev/null || die "npm not found; install Node.js (npm) to fetch $NPM_SPEC"
    echo "fetching $NPM_SPEC (232 KB) into $CACHE" >&2
    (cd "$tmp" && npm pack "$NPM_SPEC" --silent >/dev/null) || die "npm pack $NPM_SPEC failed"
    check "$tmp/$NPM_TGZ" "$NPM_TGZ_SHA"
    tar -xzf "$tmp/$NPM_TGZ" -C "$tmp" package/src/chat-template-automap.ts
    check "$tmp/package/src/chat-template-automap.ts" "$AUTOMAP_SHA"
    mv "$tmp/package/src/chat-template-automap.ts" "$CACHE/chat-template-automap.ts"
fi

if ! intact "$CACHE/command-r7b.jinja" "$COMMAND_R7B_SHA"; then
    pip=("$VENV/bin/python" -m pip)
    [[ -x "$VENV/bin/python" ]] || pip=(python3 -m pip)
    echo "fetching the llama-cpp-python==0.3.16 sdist (50 MB, once) into $CACHE" >&2
    "${pip[@]}" download --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==0.3.16" -d "$tmp" || die "pip download llama-cpp-python==0.3.16 failed"
    check "$tmp/$SDIST" "$SDIST_SHA"
    tar -xzf "$tmp/$SDIST" -C "$tmp" "$SDIST_MEMBER"
    check "$tmp/$SDIST_MEMBER" "$COMMAND_R7B_SHA"
    mv "$tmp/$SDIST_MEMBER" "$CACHE/command-r7b.jinja"
fi

check "$CACHE/chat-template-automap.ts" "$AUTOMAP_SHA"
check "$CACHE/command-r7b.jinja" "$COMMAND_R7B_SHA"
