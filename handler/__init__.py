"""TorchServe handler for Stable Diffusion v1: JSON in, PNG or JSON out; the model work is `ldm`'s."""
