"""`station demo`: the real station on virtual boards, with no hardware and no cloud.

    run.py       the rig in its own process (`python -m station.sim`), the station as
                 `station run` would be, a local CA; results left in the working folder
    firmware.py  a deterministic, ESP-IDF-like build per chip (demos, tests, benchmarks)
"""

from station.demo.firmware import esp_image, make_demo_firmware, partition_table
from station.demo.run import run_demo, write_demo_config

__all__ = ["esp_image", "make_demo_firmware", "partition_table", "run_demo", "write_demo_config"]
