"""Online serving benchmark: a load generator for the jaxserve gRPC server, with vLLM's metric
definitions (`jaxserve.bench.serving`, --help says how each is defined).

    python scripts/bench_serving.py --launch --num-prompts 32 --input-len 32 --output-len 32 \\
        --request-rate 4
    python scripts/bench_serving.py --target localhost:50051 --request-rate inf \\
        --max-concurrency 8 --goodput ttft:500 tpot:50 --result-json out.json
    python scripts/bench_serving.py --target localhost:50051 --dataset jsonl \\
        --dataset-path prompts.jsonl --request-rate 2 --burstiness 0.5
"""

import sys

from jaxserve.bench import serving

if __name__ == "__main__":
    sys.exit(serving.main())
