"""Triton kernels for every hot path; each op's plain-torch twin lives in qkv/kernels/.

``IMPLS[op] = (kernel wrapper, supports-check)``: the check returns why a case is not supported
(the dispatcher then uses the reference under ``backend="auto"`` and raises under
``backend="triton"``), or None.
"""

from qkv.kernels.triton.attention import attention_supports, attention_triton
from qkv.kernels.triton.decode import decode_supports, decode_triton
from qkv.kernels.triton.decompress import decompress_spans_supports, decompress_spans_triton
from qkv.kernels.triton.hadamard import hadamard_supports, hadamard_triton
from qkv.kernels.triton.kmeans.assign import assign_supports, assign_triton
from qkv.kernels.triton.kmeans.far import far_tokens_supports, far_tokens_triton, reseed_supports, reseed_triton
from qkv.kernels.triton.kmeans.seeding import kmeanspp_supports, kmeanspp_triton
from qkv.kernels.triton.kmeans.update import update_triton
from qkv.kernels.triton.merge import merge_supports, merge_triton
from qkv.kernels.triton.quantize import (
    dequantize_supports,
    dequantize_triton,
    quantize_pack_supports,
    quantize_pack_triton,
)

IMPLS = {
    "quantize_pack": (quantize_pack_triton, quantize_pack_supports),
    "dequantize": (dequantize_triton, dequantize_supports),
    "kmeans_assign": (assign_triton, assign_supports),
    "kmeans_update": (update_triton, None),
    "kmeans_far": (far_tokens_triton, far_tokens_supports),
    "kmeans_reseed": (reseed_triton, reseed_supports),
    "kmeanspp": (kmeanspp_triton, kmeanspp_supports),
    "hadamard": (hadamard_triton, hadamard_supports),
    "attention": (attention_triton, attention_supports),
    "attention_decode": (decode_triton, decode_supports),
    "merge": (merge_triton, merge_supports),
    "decompress_spans": (decompress_spans_triton, decompress_spans_supports),
}
