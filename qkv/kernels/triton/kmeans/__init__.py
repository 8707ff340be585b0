"""Triton k-means kernels, twins of qkv/kernels/kmeans.py, a module each:
:mod:`.assign` (the nearest centroid; from :mod:`.nearest`'s building blocks), :mod:`.update`
(the means of the clusters: one-hot sums from :mod:`.sums`, or sorted runs), :mod:`.seeding`
(weighted D^2 sampling for k-means++ and k-means||) and :mod:`.far` (the far tokens that re-seed
empty clusters)."""
