"""Coverage of rmse_interval over disjoint seed ranges, from the per-seed files of scripts/coverage_data.py:

  python scripts/coverage_study.py /tmp/cov/gmm/*.npz

For each file and N: split the seeds into len // N disjoint ranges of N seeds, and count the ranges whose 95 %
interval contains the RMSE on all seeds of the file. Prints coverage per variant and the tail shares seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from iia_cli.metrics import uncertainty as U


def coverage(sq, count, n, variant):
    truth = U.rmse_value(sq, count)
    hits, shares, warned, warned_miss = 0, [], 0, 0
    ranges = len(sq) // n
    for r in range(ranges):
        s = slice(r * n, (r + 1) * n)
        iv = U.rmse_interval(sq[s], count[s], variant=variant)
        hit = iv.low <= truth <= iv.high
        hits += hit
        shares.append(U.tail_share(sq[s]))
        warned += bool(iv.warning)
        warned_miss += bool(iv.warning) and not hit
    return hits / ranges, ranges, np.array(shares), warned, warned_miss


def main(paths):
    print("file N ranges cov_percentile cov_bca tail_all tail_median tail_max warned(miss)")
    for path in paths:
        d = np.load(path)
        sq, count = d["sq"], d["count"]
        for n in (64, 128, 256):
            cp, ranges, shares, warned, wm = coverage(sq, count, n, "percentile")
            cb, *_ = coverage(sq, count, n, "bca")
            print(f"{Path(path).stem} {n} {ranges} {cp:.3f} {cb:.3f} {U.tail_share(sq):.3f} "
                  f"{np.median(shares):.3f} {shares.max():.3f} {warned}({wm})")


if __name__ == "__main__":
    main(sys.argv[1:])
