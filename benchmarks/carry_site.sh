#!/usr/bin/env bash
# Build .whl/site312.txz: the Python packages of requirements-gpu.lock that the lent GPU machine
# lacks (its image has torch, numpy, pandas, pyarrow, accelerate, ... for Python 3.12), plus the
# lock's transformers and peft, as one xz archive under the 64 MiB a device call may carry.
# bitsandbytes keeps only its CUDA 13.0 library; jieba only what `jieba.cut` reads.
set -euo pipefail
cd "$(dirname "$0")/.."
LOCK=requirements-gpu.lock
# on the image already (its package list, 2026-11-17): not carried
PRESENT="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
certifi charset-normalizer click cloudpickle colorama contourpy cycler filelock fonttools
frozenlist fsspec h11 hf-xet httpcore httpx idna iniconfig jinja2 joblib kiwisolver markdown
markdown-it-py markupsafe matplotlib mdurl mpmath msgpack multidict networkx numpy packaging
pandas pathspec pillow pip pluggy portalocker prometheus-client propcache protobuf psutil
pyarrow pygments pyparsing pytest python-dateutil pyyaml regex requests rich safetensors
scikit-learn scipy sentencepiece setuptools shellingham six sympy tabulate threadpoolctl
tokenizers torch tqdm typer typing-extensions urllib3 werkzeug wheel wrapt xxhash yarl zipp
sortedcontainers typing-inspect mypy-extensions"
SKIP="playwright uv greenlet-dummy triton"    # triton: the image's, built for its torch
WHL=$(mktemp -d) SITE=$(mktemp -d)
grep -E '^[a-z0-9].*==' "$LOCK" | while read -r pin; do
  name=${pin%%==*}
  case " $(echo $PRESENT $SKIP) " in *" $name "*) continue;; esac
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" "$pin" \
  || python3 -m pip wheel -q --no-deps -w "$WHL" "$pin"          # pure-Python sdists (jieba)
done
for w in "$WHL"/*.whl; do unzip -q -o "$w" -d "$SITE"; done
rm -rf "$SITE"/mlflow/server/js "$SITE"/jieba/posseg "$SITE"/jieba/lac_small \
  "$SITE"/jieba/analyse/idf.txt
find "$SITE"/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' -delete
find "$SITE" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p .whl
OUT="$PWD/.whl/site312.txz"             # $PWD before the cd below
(cd "$SITE" && python3 -c "import tarfile, lzma; t = tarfile.open('$OUT', 'w:xz', preset=9 | lzma.PRESET_EXTREME); t.add('.', arcname='.'); t.close()")
ls -la .whl/site312.txz
