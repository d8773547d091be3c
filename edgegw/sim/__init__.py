"""Simulation kit for ``edgegw-sim``, the demo and tests: devices (MQTT, CoAP), a fleet run with chaos and bad actors,
a cloud sink, a cuttable link, and an in-process upstream broker. See simulators/README.md."""

from edgegw.sim.coap_device import CoapDevice
from edgegw.sim.device import Device, LatencySamples, SeqSet
from edgegw.sim.fleet import Fleet
from edgegw.sim.netcut import NetCut
from edgegw.sim.runner import FleetRun
from edgegw.sim.scenario import Scenario, load_scenario
from edgegw.sim.sink import CloudSink

__all__ = ["CloudSink", "CoapDevice", "Device", "FleetRun", "LatencySamples", "NetCut", "Scenario", "SeqSet",
           "Fleet", "load_scenario"]
