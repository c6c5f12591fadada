"""Disaggregated prefill/decode against the colocated engine (TTFT, TPOT, goodput, handoff
bytes and ms by format pair). The benchmark is `jaxserve.bench.disagg`; `--help` lists the
flags.
"""

from jaxserve.bench import disagg
from jaxserve.bench.devices import simulate_cpu_devices

if __name__ == "__main__":
    simulate_cpu_devices(8, cpu_only=True)
    disagg.main()
