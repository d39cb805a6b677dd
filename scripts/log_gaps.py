#!/usr/bin/env python
"""Tee standard input to standard output and to a log file, then append how long the output stayed silent:

    iia evaluate 2>&1 | python scripts/log_gaps.py results/readme/mnist-testbed.log

The last line of the log says the longest stretch without a line and how many stretches exceeded 30 s (the
README promises a line at least every 30 s). The lines themselves are written unchanged."""

from __future__ import annotations

import sys
import time

LIMIT_S = 30.0


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: ... | log_gaps.py LOG", file=sys.stderr)
        return 2
    gaps: list[float] = []
    after: list[str] = []  # the line each stretch of silence followed
    with open(sys.argv[1], "w", encoding="utf-8") as log:
        last, previous = time.monotonic(), "(the start)"
        for line in sys.stdin:
            now = time.monotonic()
            gaps.append(now - last)
            after.append(previous)
            last, previous = now, line.strip()
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
        gaps.append(time.monotonic() - last)
        after.append(previous)
        over = [g for g in gaps if g > LIMIT_S]
        worst = max(range(len(gaps)), key=gaps.__getitem__)
        summary = (f"output cadence: {len(gaps) - 1} lines, longest stretch without output {gaps[worst]:.1f} s "
                   f"(after '{after[worst][:100]}'), {len(over)} stretches over {LIMIT_S:.0f} s\n")
        sys.stdout.write(summary)
        log.write(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
