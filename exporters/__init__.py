"""Build-machine side of Edge: export, quantize, verify fidelity and pack signed bundles.

Needs the ``export`` extra (torch, transformers, optimum-onnx); never imported on devices.
"""
