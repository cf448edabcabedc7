"""The routing recorder's load-balance loss by scope: `micro_batch` counts f_i on each forward's own tokens;
`global` on the optimizer step's tokens so far (its micro-batches up to this one) and, given a process group, on
every process's (tested against one process in tests/train/test_parallel.py)."""

import torch

from moe_cli.moe import MoEMlp, RoutingRecorder


def switch_loss(layer: MoEMlp, counted: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """E * sum_i f_i P_i with f_i over the router's choices on ``counted`` and P_i the mean probability on
    ``forward``, by hand."""
    r_all, r_now = layer.router(counted), layer.router(forward)
    f = torch.bincount(r_all.choices.flatten(), minlength=layer.num_experts).float() / r_all.choices.numel()
    return layer.num_experts * (f * r_now.probs.mean(0)).sum()


def test_global_scope_counts_the_steps_micro_batches_so_far():
    torch.manual_seed(0)
    layer = MoEMlp(8, 16, num_experts=4, k=2).train()
    x1, x2 = torch.randn(6, 8), torch.randn(10, 8)
    # by hand, before the recorder listens (its hooks would count these forwards too)
    want1, want12, want2 = switch_loss(layer, x1, x1), switch_loss(layer, torch.cat([x1, x2]), x2), \
        switch_loss(layer, x2, x2)
    with RoutingRecorder(layer, aux=True) as rec:
        layer(x1)
        g1, _ = rec.aux_loss(1.0, 0.0, "global")
        m1, _ = rec.aux_loss(1.0, 0.0, "micro_batch")
        torch.testing.assert_close(g1, m1)  # the first micro-batch: the same tokens
        torch.testing.assert_close(g1, want1)
        layer(x2)
        g2, _ = rec.aux_loss(1.0, 0.0, "global")
        m2, _ = rec.aux_loss(1.0, 0.0, "micro_batch")
        torch.testing.assert_close(g2, want12)  # f over both micro-batches, P over the second
        torch.testing.assert_close(m2, want2)
        assert not torch.allclose(g2, m2)
        rec.take_counts()  # the optimizer step: the next step counts afresh
        layer(x1)
        torch.testing.assert_close(rec.aux_loss(1.0, 0.0, "global")[0], want1)


def test_eval_forwards_do_not_count_toward_the_step():
    torch.manual_seed(0)
    layer = MoEMlp(8, 16, num_experts=4, k=2)
    x1, x2 = torch.randn(6, 8), torch.randn(10, 8)
    want = switch_loss(layer, x2, x2)
    with RoutingRecorder(layer, aux=True) as rec:
        layer.eval()(x1)
        layer.train()(x2)
        torch.testing.assert_close(rec.aux_loss(1.0, 0.0, "global")[0], want)
