#!/bin/bash
# Installs what tests/e2e/test_vscode_real.py needs, offline apart from the npm registry
# and Debian packages: Chromium, code-server (VS Code in the browser) and playwright-core,
# into $CODEVISTA_CODE_SERVER_DIR (default ~/.cache/codevista-code-server).
# code-server's postinstall downloads ripgrep from GitHub, so it is replaced by these steps:
# install without scripts, put Debian's rg where @vscode/ripgrep expects its binary, then
# build the native modules against the system Node headers.
set -euo pipefail
DIR="${CODEVISTA_CODE_SERVER_DIR:-$HOME/.cache/codevista-code-server}"
if [ -x "$DIR/node_modules/.bin/code-server" ] && [ -d "$DIR/node_modules/playwright-core" ]; then
  echo "already installed in $DIR"; exit 0
fi
if ! command -v chromium >/dev/null || ! command -v rg >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium libkrb5-dev ripgrep
fi
export npm_config_yes=true npm_config_nodedir=/usr
mkdir -p "$DIR" && cd "$DIR"
[ -f package.json ] || npm init -y >/dev/null
npm install --no-audit --no-fund --ignore-scripts code-server@4.100.3 playwright-core@1.65.1
npm rebuild argon2
cd node_modules/code-server/lib/vscode
npm install --omit=dev --ignore-scripts --no-audit --no-fund
mkdir -p node_modules/@vscode/ripgrep/bin
ln -sf "$(command -v rg)" node_modules/@vscode/ripgrep/bin/rg
npm rebuild
rm -rf node_modules.asar && ln -s node_modules node_modules.asar
(cd bin/remote-cli && ln -sf code-linux.sh code-server)
(cd bin/helpers && ln -sf browser-linux.sh browser.sh)
cd extensions
npm install --omit=dev --ignore-scripts --no-audit --no-fund
echo "installed in $DIR"
