"""Offline benchmark: jaxserve with default settings, side by side with HF transformers and with
what the machine itself allows (`jaxserve.bench.offline`, --help says what each part measures).

    python scripts/bench_offline.py --json bench.json                 # everything (long)
    python scripts/bench_offline.py --parts machine,decode --json d.json
    python scripts/bench_offline.py --repeats 1 --mixed-requests 16 --batches 1,8 --force
"""

from jaxserve.bench import offline

if __name__ == "__main__":
    offline.main()
