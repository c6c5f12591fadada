"""Online serving benchmark: a load generator for the jaxserve gRPC server, with vLLM's metric
definitions. The benchmark is `jaxserve.bench.serving`; `--help` says how each metric is
defined and lists the flags, with examples.
"""

import sys

from jaxserve.bench import serving

if __name__ == "__main__":
    sys.exit(serving.main())
