#!/usr/bin/env bash
# DALI for an offline GPU machine whose transfers are capped at 64 MiB a call: download the
# wheels (Python 3.12, x86-64, CUDA 13), unpack them into one site tree, drop the extension
# modules of other Python versions, and xz it into three parts of about 60 MB in .gpuwheels/x0..x2
# (git-ignored). The wheels as they come need six calls; this needs three (187 MB from 266).
#
#   bash benchmarks/stage_dali.sh            # here, once (about 4 minutes on 2 cores)
#   then on the GPU machine, one call per part, each carrying .gpuwheels/xN and starting with
#     mkdir -p /tmp/gw && cp .gpuwheels/xN/* /tmp/gw/ && ...
#   gpu_session.sh unpacks /tmp/gw into /tmp/site once all parts are there (see gw.sha256).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
grep -qx '/.gpuwheels/' .git/info/exclude 2>/dev/null || echo '/.gpuwheels/' >> .git/info/exclude
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64)
# The GPU image has numpy, packaging, six, pyyaml and typing_extensions already.
for spec in nvidia-dali-cuda130==2.4.0 'nvidia-nvimgcodec-cu13[all]>=0.9.0,<0.10.0' nvidia-libnvcomp-cu13==5.3.0.16 \
            nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13 astunparse gast optree nvtx makefun 'libcst~=1.8'; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$work/wheels" "$spec"
done
mkdir "$work/site"
for w in "$work"/wheels/*.whl; do (cd "$work/site" && python3 -m zipfile -e "$w" .); done
# Only CPython 3.12's extension modules are loaded there.
find "$work/site" -name '*.cpython-3*-x86_64-linux-gnu.so' ! -name '*cpython-312-*' -delete
tar -C "$work/site" -cf - . | xz -T0 -6 > "$work/site.tar.xz"
rm -rf .gpuwheels/x0 .gpuwheels/x1 .gpuwheels/x2
mkdir -p .gpuwheels
split -n 3 -d -a 1 "$work/site.tar.xz" "$work/gw.part."
for i in 0 1 2; do mkdir -p ".gpuwheels/x$i" && mv "$work/gw.part.$i" ".gpuwheels/x$i/"; done
(cd "$work" && sha256sum site.tar.xz | sed 's/site.tar.xz/gw.tar.xz/') > .gpuwheels/x2/gw.sha256
du -sh .gpuwheels/x*
# A call carries the working tree with its part, 64 MiB in all: say how much room is left.
tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
part=$(du -cb .gpuwheels/x2/* | tail -1 | cut -f1)
echo "a call carries $(( (tree + part) / 1048576 )) MiB of 64 (working tree $(( tree / 1024 )) KiB + one part)"
[ $(( tree + part )) -lt $(( 64 * 1048576 )) ] || { echo "over 64 MiB: split into four parts"; exit 1; }
