"""From checkpoint to robot: a gRPC policy server and its client (server.py, client.py), the message
encoding (wire.py) and TorchScript export (export.py)."""
