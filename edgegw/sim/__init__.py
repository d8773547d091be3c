"""Simulation kit for the demo, tests and (later) ``edgegw-sim``: devices, a cloud sink, a cuttable link, and an
in-process upstream broker. See simulators/README.md."""

from edgegw.sim.device import Device, LatencySamples, SeqSet
from edgegw.sim.fleet import Fleet
from edgegw.sim.netcut import NetCut
from edgegw.sim.sink import CloudSink

__all__ = ["CloudSink", "Device", "Fleet", "LatencySamples", "NetCut", "SeqSet"]
