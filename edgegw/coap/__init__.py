"""CoAP ingress (docs/COAP.md): coaps+tcp with client certificates, the ``/ps`` publish/observe resources.

``server.py`` composes (aiocoap Context, listeners, start/stop, downlink), ``tls_listener.py`` accepts and
authenticates coaps+tcp connections, ``site.py`` holds the resources. ``dtls.py`` (DTLS with X.509) is a separate
transport that joins the same site.
"""

from edgegw.coap.server import CoAPServer
from edgegw.coap.site import Admit, CoAPStats, PubSubSite, always_admit

__all__ = ["Admit", "CoAPServer", "CoAPStats", "PubSubSite", "always_admit"]
