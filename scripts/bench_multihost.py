"""Two processes x 4 CPU devices against one process x 8: step time and the plan's cost per
step. The benchmark is `jaxserve.bench.multihost`; `--help` lists the flags.

    python scripts/bench_multihost.py --meshes "tp=8:tp;dp=2,tp=4:dp_tp"
"""

import sys

from jaxserve.bench import multihost

if __name__ == "__main__":
    sys.exit(multihost.main())
