"""Offline benchmark: jaxserve with default settings, side by side with HF transformers and with
what the machine itself allows. The benchmark is `jaxserve.bench.offline`; `--help` says what
each part measures and lists the flags, with examples.
"""

from jaxserve.bench import offline

if __name__ == "__main__":
    offline.main()
