"""The swarm spoken over py-libp2p and trio instead of hivemind and its p2pd (issue 22: native
Windows peers, where hivemind has no wheel). `host` makes the libp2p host from a locoswarm
identity file, `rpc` carries hivemind's unary calls, `peerrouting` learns where a peer listens
and `dht` is a client-mode DHT client that hivemind's DHT nodes accept.

This package never imports hivemind and no hivemind-side code imports it: py-libp2p and
hivemind cannot share a process (their protobuf descriptors collide). It sits above
`protocol/`, whose hivemind-free codecs it uses (docs/windows.md).
"""
