"""Load generation and serving benchmarks (torch-free).

``serving`` measures images/s through the gateway (REST) and straight to Triton's ``score``
model (gRPC) at several concurrencies, next to the in-process ONNX Runtime ceiling, all in one
run (`reward-service bench serving`). ``locustfile.py`` is the Locust scenario for sizing a
deployment.
"""
