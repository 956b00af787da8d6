"""Stable Diffusion v1 inference in plain PyTorch: load original CompVis checkpoints, generate their exact images.

Nothing is imported here, so light modules (e.g. `ldm.output_names`) stay importable without loading torch.
"""
