#!/usr/bin/env bash
# Regenerate the README's default-evaluation table, plot and sample grid, and paste the table into README.md.
# Run from a clean checkout (the rows record the git revision; a dirty tree is refused), after scripts/setup.sh:
#
#   bash scripts/readme_tables.sh
#
# It removes results/mnist-testbed.csv and the stored reference solves first, so every row is computed at this
# commit; the FID reference statistics of the held-out digits are kept when cached (they depend only on the data,
# the Inception weights and their count). tests/test_readme.py checks that README.md's table equals what
# `iia report results/readme/mnist-testbed.csv` prints.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "error: the checkout has uncommitted changes; commit (or stash) them first, so that the rows carry a clean git revision" >&2
    exit 2
fi
IIA=.venv/bin/iia
export COLUMNS=80  # the width the README shows and tests/test_readme.py compares
rm -f results/mnist-testbed.csv
rm -rf results/cache/solves
start=$(date +%s)
# The log goes to a temporary file first: results/readme/mnist-testbed.log is tracked, and writing it during the
# run would make the rows' git revision read -dirty.
log=$(mktemp)
PYTHONUNBUFFERED=1 "$IIA" evaluate 2>&1 | .venv/bin/python scripts/log_gaps.py "$log"  # + silence stats
echo "default evaluation: $(( $(date +%s) - start )) s wall" | tee -a "$log"
cp "$log" results/readme/mnist-testbed.log && rm -f "$log"
cp results/mnist-testbed.csv results/readme/mnist-testbed.csv
"$IIA" report results/readme/mnist-testbed.csv > results/readme/mnist-testbed.txt  # the table, as tests/test_readme.py prints it
"$IIA" report results/readme/mnist-testbed.csv --plot results/readme/mnist-testbed.png > /dev/null
"$IIA" sample --method iia-ddim --nfe 10 --seeds 0-63 --out /tmp/iia-readme-samples.npz \
    --grid-png results/readme/samples-iia-ddim-nfe10.png
for m in dpm-solver++-2m iia-dpm-solver++-2m; do  # the pair whose KID and FID the README explains
    "$IIA" sample --method "$m" --nfe 6 --seeds 0-15 --out "/tmp/iia-readme-$m.npz" \
        --grid-png "results/readme/samples-$m-nfe6.png"
done
.venv/bin/python - <<'PY'
from pathlib import Path

readme, table = Path("README.md"), Path("results/readme/mnist-testbed.txt").read_text().rstrip("\n")
text = readme.read_text()
start = text.index("<!-- default-table -->\n```\n") + len("<!-- default-table -->\n```\n")
end = text.index("\n```", start)
readme.write_text(text[:start] + "\n".join(line.rstrip() for line in table.splitlines()) + text[end:])
print("README.md: default table updated from results/readme/mnist-testbed.txt")
PY
