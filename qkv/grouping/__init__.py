"""Grouping strategies (registry ``GROUPING``): ``kmeans``, ``faiss``, ``blocks``, ``none``."""

from qkv.grouping.base import GROUPING, ClusteringGrouper, Grouper, Groups
from qkv.grouping.blocks import BlockGrouper
from qkv.grouping.faiss_kmeans import FaissGrouper
from qkv.grouping.kmeans import KMeansGrouper, KMeansResult, kmeans
from qkv.grouping.none import NoGrouping

__all__ = [
    "GROUPING",
    "BlockGrouper",
    "ClusteringGrouper",
    "FaissGrouper",
    "Grouper",
    "Groups",
    "KMeansGrouper",
    "KMeansResult",
    "NoGrouping",
    "kmeans",
]
