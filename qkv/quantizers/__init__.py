"""Quantizers, smoothers, residual staging and packing formats, each with its own registry."""

from qkv.quantizers.affine import QUANTIZERS, AffineQuantizer, CastQuantizer, Quantizer
from qkv.quantizers.packing import PACKING, BitPacker, I32LSBPacker, U8MSBPacker
from qkv.quantizers.smoothing import SMOOTHING, CentroidSmoother, HadamardSmoother, Smoother
from qkv.quantizers.staging import STAGING, ProgressiveResidual, SingleStage, Staging

__all__ = [
    "PACKING",
    "QUANTIZERS",
    "SMOOTHING",
    "STAGING",
    "AffineQuantizer",
    "BitPacker",
    "CastQuantizer",
    "CentroidSmoother",
    "HadamardSmoother",
    "I32LSBPacker",
    "ProgressiveResidual",
    "Quantizer",
    "SingleStage",
    "Smoother",
    "Staging",
    "U8MSBPacker",
]
