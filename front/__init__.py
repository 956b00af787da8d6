"""The web front on port 5000: the original app's `/imagine` API and a browser UI, in front of TorchServe.

It holds no model and checks no request field of the inference API: TorchServe's handler does that and names the
field at fault, and the front passes its answer on. What the front adds is what the original app did and TorchServe
does not: any number of iterations (`n_iter`), a JSON array of PNGs, a seed drawn here so every image's seed is
known, the progress stream relayed to browsers, and the page itself.
"""
