# edgegw: package marker only (upstream: "from . import MQTTV311").
