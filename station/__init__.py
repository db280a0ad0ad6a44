"""station: an ESP32 production flashing station.

Boards plugged into a USB hub are identified, registered in the cloud, given their
credentials in a data partition and flashed, all at once, each by its own async worker.
"""

__version__ = "0.1.0"
