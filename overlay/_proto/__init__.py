"""containerd's gRPC API as generated protobuf/gRPC modules (committed).

The ``.proto`` sources here are ours, wire-compatible with containerd 1.6;
``python -m overlay._proto.regenerate`` rebuilds the ``*_pb2.py``,
``*_pb2.pyi`` and ``*_pb2_grpc.py`` modules beside them, and a test fails when
they are stale.  Only ``overlay.server`` and ``overlay.client`` import them.
"""
