"""On real K/V, QVG beats RTN at no more bits per element, for keys and for values."""

import pytest
import torch

from qkv.evaluation.metrics import ErrorSum
from qkv.evaluation.suite import entry, fit_clusters, predicted_bits
from qkv.realdata import list_datasets, load_dataset

HEADS = 2  # the first heads of every layer keep the test fast; centroid cost per head is unchanged


@pytest.mark.realdata
@pytest.mark.parametrize("dataset", list_datasets())
def test_qvg_beats_rtn_at_no_more_bits(dataset):
    samples = load_dataset(dataset, progress=False)
    pairs = [(s.k[:, :HEADS].bfloat16(), s.v[:, :HEADS].bfloat16()) for s in samples]
    shapes = [tuple(k.shape) for k, _ in pairs]
    # RTN at its preset (2.5 bits); where QVG's fixed costs exceed that (D = 32: assignments alone
    # cost 0.25 bits), RTN with twice as many scales (3 bits).
    for block in (16, 8):
        rtn = entry("rtn", "matched", block=block)
        budget = predicted_bits(rtn.policy, shapes, torch.bfloat16)
        qvg = fit_clusters("qvg", shapes, torch.bfloat16, budget)
        if qvg is not None:
            break
    assert qvg is not None, f"no qvg configuration fits {budget:.3f} bits on {dataset}"

    def errors(policy):
        err_k, err_v, nbytes = ErrorSum(), ErrorSum(), 0
        for k, v in pairs:
            ckv = policy.compress(k, v)
            k_hat, v_hat = policy.decompress(ckv)
            err_k.add(k, k_hat)
            err_v.add(v, v_hat)
            nbytes += ckv.nbytes
        elements = 2 * sum(k.numel() for k, _ in pairs)
        return err_k.relative_mse, err_v.relative_mse, 8 * nbytes / elements

    qk, qv, qbits = errors(qvg.policy)
    rk, rv, rbits = errors(rtn.policy)
    assert qbits <= rbits, (qvg.name, qbits, rtn.name, rbits)
    assert qk < rk and qv < rv, f"{dataset}: {qvg.name} K {qk:.4f} V {qv:.4f} vs {rtn.name} K {rk:.4f} V {rv:.4f}"
