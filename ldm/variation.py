"""A1111's variation seeds: an image's starting noise bent toward another seed's by a strength.

Why: a user who likes an image asks for variations of it, images near it but not it. Keeping the seed and mixing in a
little of another seed's noise does that; A1111 calls the other seed the "variation seed" (`subseed`) and the mix
its strength, and its shared PNGs carry both. As in A1111 1.6:
- image i keeps the request's seed (all images of the request share it) and takes variation seed `subseed` + i;
- its noise is the spherical interpolation from its seed's noise (strength 0) to its variation seed's (strength 1),
  which keeps the noise's norm where a straight mix would shrink it;
- the interpolation runs along axis 1 of an image's (C, h, w) noise, each (channel, column) vector of h values on
  its own: what A1111's `slerp` does to the tensors it is given, so a shared image's variation is this one.
"""

from __future__ import annotations

import torch

# Above this mean cosine the two noises are (nearly) one: the angle's sine is too small to divide by, and a straight
# mix is the interpolation to float precision (A1111's threshold; in practice a variation seed equal to the seed,
# whose noise is the seed's, where A1111's mix, which weighs the two the other way round, gives the same).
_PARALLEL = 0.9995


def slerp(strength: float, noise: torch.Tensor, variation: torch.Tensor) -> torch.Tensor:
    """One image's (C, h, w) noise moved toward its variation seed's by `strength`, along axis 1."""
    low = noise / torch.norm(noise, dim=1, keepdim=True)
    high = variation / torch.norm(variation, dim=1, keepdim=True)
    cosine = (low * high).sum(1)
    if cosine.mean() > _PARALLEL:
        return (1.0 - strength) * noise + strength * variation
    omega = torch.acos(cosine)
    sine = torch.sin(omega)
    start = (torch.sin((1.0 - strength) * omega) / sine).unsqueeze(1)
    end = (torch.sin(strength * omega) / sine).unsqueeze(1)
    return start * noise + end * variation
