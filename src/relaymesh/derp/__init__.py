"""DERP: the TCP relay of last resort, addressed by node key.

``frames`` is the sans-IO codec and handshake; ``server`` the relay (``relaymesh derp serve``),
``client`` what nodes use, ``mesh`` server-to-server links, ``admission`` who may connect,
``metrics`` the Prometheus counters. See docs/derp.md.
"""
