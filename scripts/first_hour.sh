#!/usr/bin/env bash
# Replays a new user's first hour (docs/first_hour.md), twice, from what is committed (HEAD):
#   A. a wheel in a clean venv: `pip wheel . --no-deps`, then a fresh venv with the runtime
#      dependencies only (no torch), used from a directory outside the repository;
#   B. a fresh clone: the README's Quick start (scripts/setup.sh, scripts/demo.sh) and the
#      first-hour tests, with ../shared beside the clone as the README asks.
# Prints one PASS / FAIL / SKIP line per check and a summary; exits 1 if anything failed.
#   bash scripts/first_hour.sh            # both parts, side by side (mostly waiting on pip)
#   bash scripts/first_hour.sh wheel      # part A only
#   bash scripts/first_hour.sh clone      # part B only
# Uncommitted changes are not seen: the replay starts from `git clone` of this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
python=${PYTHON:-python3}
parts=${1:-all}
if [ "$parts" = all ]; then
    out=$(mktemp -d "${TMPDIR:-/tmp}/vce-first-hour-out.XXXXXX")
    started=$SECONDS
    bash "$0" wheel >"$out/wheel" 2>&1 &
    wheel_pid=$!
    bash "$0" clone >"$out/clone" 2>&1
    clone_status=$?
    wait "$wheel_pid"
    wheel_status=$?
    grep -v -E "^(first hour:|FIRST HOUR:)" "$out/wheel" "$out/clone" --no-filename
    totals=$(cat "$out/wheel" "$out/clone" | sed -n -E 's/^first hour: ([0-9]+) passed, ([0-9]+) failed, ([0-9]+) skipped.*/\1 \2 \3/p' \
        | awk '{p += $1; f += $2; s += $3} END {print p, f, s}')
    rm -rf "$out"
    read -r p f s <<<"$totals"
    status=$(( wheel_status || clone_status ))
    echo "first hour: ${p:-0} passed, ${f:-0} failed, ${s:-0} skipped in $((SECONDS - started)) s"
    [ "$status" = 0 ] && echo "FIRST HOUR: PASS" || echo "FIRST HOUR: FAIL"
    exit "$status"
fi
case "$parts" in wheel|clone) ;; *) echo "usage: first_hour.sh [all|wheel|clone]" >&2; exit 2 ;; esac
work=$(mktemp -d "${TMPDIR:-/tmp}/vce-first-hour.XXXXXX")
trap 'rm -rf "$work"' EXIT
passed=0 failed=0 skipped=0
summary=()
started=$SECONDS

report() {  # report STATUS NAME [LOG]; the time is seconds since this part started
    summary+=("$1  $2")
    printf '%s  %s  (%d s)\n' "$1" "$2" "$((SECONDS - started))"
    case "$1" in
        PASS) passed=$((passed + 1)) ;;
        SKIP) skipped=$((skipped + 1)) ;;
        *) failed=$((failed + 1)); [ -n "${3:-}" ] && sed 's/^/      | /' "$3" | tail -n 25 ;;
    esac
}

check() {  # check NAME COMMAND...: PASS when the command exits 0
    local name=$1 log="$work/log.$RANDOM"
    shift
    if "$@" >"$log" 2>&1; then report PASS "$name"; else report FAIL "$name" "$log"; fi
}

quiet() {  # quiet LOG: no build or packaging warnings in a pip log
    ! grep -E -i "BuildBackendWarning|SetuptoolsDeprecationWarning|deprecated|is absent from the .packages." "$1"
}

# -- the committed tree, cloned -----------------------------------------------------------
mkdir -p "$work/clone"
clone="$work/clone/vce-deploy"
git clone --quiet "$root" "$clone" || { echo "FAIL  git clone $root"; exit 1; }
[ -d "$root/../shared" ] && ln -s "$(cd "$root/../shared" && pwd)" "$work/clone/shared"
echo "first hour of commit $(git -C "$clone" rev-parse --short HEAD), in $work"

# -- A. a wheel in a clean venv, no torch ----------------------------------------------------
if [ "$parts" = wheel ]; then
    (cd "$clone" && "$python" -m pip wheel . --no-deps --wheel-dir "$work/dist") >"$work/wheel.log" 2>&1
    check "A: pip wheel . --no-deps builds" test -n "$(ls "$work"/dist/*.whl 2>/dev/null)"
    check "A: the build prints no setuptools warnings" quiet "$work/wheel.log"
    "$python" -m venv "$work/venv"
    venv="$work/venv/bin"
    "$venv/python" -m pip install --quiet "$work"/dist/*.whl >"$work/install.log" 2>&1
    check "A: pip install the wheel (runtime dependencies only)" "$venv/python" -c "import vce_deploy"
    check "A: the install prints no warnings" quiet "$work/install.log"
    check "A: no torch in this venv (the runtime must not need it)" \
        bash -c "! '$venv/python' -c 'import torch' 2>/dev/null"
    mkdir -p "$work/user" && cd "$work/user"
    "$venv/python" - "$clone/README.md" >"$work/api.log" 2>&1 <<'PY'
import sys, tempfile, os
import numpy as np
from PIL import Image, ImageDraw
import vce_deploy
from vce_deploy import Converter, InputError

def glyph(mode, seed):  # a few dark strokes on white (transparent for RGBA)
    image = Image.new(mode, (105, 90), (255, 255, 255, 0) if mode == "RGBA" else "white")
    rng = np.random.default_rng(seed)
    for _ in range(3):
        ImageDraw.Draw(image).line(tuple(int(v) for v in rng.integers(10, 80, 4)), fill=(0, 0, 0, 255)[:len(mode)], width=9)
    return image

for seed, name in enumerate(("glyph.png", "a.png", "a_bold.png", "b.png", "c.png")):
    glyph("L", seed).save(name)
glyph("RGBA", 7).save("rgba.png")
converter = Converter.load()
rgb = np.asarray(Image.open("rgba.png").convert("RGB"))
assert converter.convert(rgb, n=4, seed=0).shape == (1, 4, 28, 28), "(H, W, 3) array read as a batch"
rgba = np.asarray(Image.open("rgba.png"))
assert np.array_equal(converter.convert(rgba, n=4, seed=0), converter.convert(Image.open("rgba.png"), n=4, seed=0))
for shape in ((0, 0), (28, 0)):
    try:
        converter.convert(np.zeros(shape), n=4)
        raise AssertionError(f"{shape}: accepted")
    except InputError:
        pass
assert converter.convert("glyph.png").shape == (1, vce_deploy.DEFAULT_N, 28, 28)
chunks = list(converter.convert_iter(["glyph.png"] * 3, n=2, progress=True))
assert sum(c.shape[0] for c in chunks) == 3
readme = open(sys.argv[1]).read()
use_it = readme[readme.index("## Use it"):]
start = use_it.index("```python") + len("```python")
exec(use_it[start:use_it.index("```", start)])
print("API checks ok")
PY
    report "$([ $? = 0 ] && echo PASS || echo FAIL)" \
        "A: API: colour arrays, empty arrays, default n, progress, the README snippet" "$work/api.log"
    check "A: vce --help" "$venv/vce" --help
    check "A: vce inspect (the shipped bundle, reported NLL readable)" \
        bash -c "'$venv/vce' inspect | grep -q 'NLL, reported: K = [0-9]'"
    check "A: vce verify (the shipped bundle; parity skipped without torch, naming the CPU build)" \
        bash -c "'$venv/vce' verify | grep 'parity against the checkpoint: skipped' | grep -q 'download.pytorch.org/whl/cpu'"
    check "A: vce convert -o out.jpg writes a JPEG" bash -c "'$venv/vce' convert glyph.png -o out.jpg --seed 0 \
        && '$venv/python' -c \"from PIL import Image; assert Image.open('out.jpg').format == 'JPEG'\""
    check "A: vce convert -n 2000 wraps the grid" bash -c "'$venv/vce' convert glyph.png -n 2000 -o wide.png \
        && '$venv/python' -c \"from PIL import Image; w, h = Image.open('wide.png').size; assert w < 2500 < h, (w, h)\""
    check "A: vce convert -o missing/dir refuses, creates nothing" bash -c "! '$venv/vce' convert glyph.png \
        -o missing/dir/x.png 2>err.txt && grep -q 'does not exist' err.txt && [ ! -e missing ]"
    check "A: vce convert says '1 glyph'" bash -c "'$venv/vce' convert glyph.png -n 1 -o one.png | grep -q '1 glyph x 1 variation,'"
    # user drawings (issue 22): a 4 px pen on a 500x500 canvas, a blank page, no -o
    "$venv/python" -c "from PIL import Image, ImageDraw
thin = Image.new('L', (500, 500), 255); d = ImageDraw.Draw(thin)
d.line((100, 80, 400, 80), fill=0, width=4); d.line((250, 80, 250, 420), fill=0, width=4)
d.ellipse((100, 250, 400, 420), outline=0, width=4); thin.save('thin.png'); Image.new('L', (300, 200), 255).save('blank.png')"
    check "A: vce convert keeps a thin pen's strokes (4 px on 500x500)" bash -c "'$venv/vce' convert thin.png -n 2 \
        --seed 0 -o thin_out.png && '$venv/python' -c \"from vce_deploy import preprocess; assert preprocess('thin.png').sum() >= 30\""
    check "A: vce convert refuses a blank image (exit 1, says so, writes nothing)" bash -c "! '$venv/vce' convert \
        blank.png -o blank_out.png 2>err.txt && grep -q 'no ink' err.txt && [ ! -e blank_out.png ]"
    check "A: vce convert without -o writes glyph.vce.png and says so" bash -c "'$venv/vce' convert glyph.png -n 2 \
        --seed 0 | grep -q 'wrote .*glyph.vce.png' && test -s glyph.vce.png"
    # every `vce COMMAND` the README names exists in the installed CLI (the benchmark is
    # `python -m bench`, source tree only: not a `vce` command, so not in this list)
    for command in $(grep -o -E '^vce [a-z-]+' "$clone/README.md" | sort -u | cut -d' ' -f2); do
        check "A: README's 'vce $command' exists in the installed CLI" "$venv/vce" "$command" --help
    done
    cd "$root"
fi

# -- B. a fresh clone: the Quick start ------------------------------------------------------
if [ "$parts" = clone ]; then
    (cd "$clone" && bash scripts/setup.sh) >"$work/setup.log" 2>&1
    check "B: bash scripts/setup.sh" test -x "$clone/.venv/bin/vce"
    check "B: setup prints no setuptools warnings" quiet "$work/setup.log"
    check "B: torch is the CPU build on this machine" \
        "$clone/.venv/bin/python" -c "import torch; assert torch.version.cuda is None, torch.version.cuda"
    if [ -d "$work/clone/shared/data/omniglot" ]; then
        check "B: bash scripts/demo.sh writes runs/demo/grid.png" \
            bash -c "cd '$clone' && bash scripts/demo.sh && test -s runs/demo/grid.png"
    else
        report SKIP "B: demo: no ../shared/data/omniglot beside the checkout"
    fi
    check "B: vce inspect from the clone's venv" bash -c "cd '$clone' && .venv/bin/vce inspect | grep -q 'NLL, reported'"
fi

echo
echo "first hour: $passed passed, $failed failed, $skipped skipped in $((SECONDS - started)) s"
[ "$failed" = 0 ] && echo "FIRST HOUR: PASS" || echo "FIRST HOUR: FAIL"
[ "$failed" = 0 ]
