"""Packed image processors: images of any size -> packed `pixel_values [N, p*p*C]` + `grid_thw`."""
