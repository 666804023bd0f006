import pytest
import torch

from sgmodel.losses import (
    AlignmentDiscriminator,
    adversarial_losses,
    combine_losses,
    contrastive_alignment_loss,
    mmd_loss,
    reconstruction_loss,
)


def test_mmd_is_zero_for_identical_batches_and_grows_with_a_shift():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    assert mmd_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    shifts = [mmd_loss(x, x + s * torch.ones(16)).item() for s in (0.1, 0.5, 2.0)]
    assert 0 < shifts[0] < shifts[1] < shifts[2]
    # two samples of one distribution are closer than samples of different ones
    same = mmd_loss(torch.randn(64, 16), torch.randn(64, 16)).item()
    assert same < shifts[2]


def test_contrastive_loss_prefers_matched_pairs():
    torch.manual_seed(0)
    images = torch.randn(8, 32)
    matched = images + 0.05 * torch.randn(8, 32)
    shuffled = matched[torch.randperm(8)]
    assert contrastive_alignment_loss(matched, images) < contrastive_alignment_loss(shuffled, images) - 1.0


def test_combined_loss_formula():
    recon, clip, mmd = torch.tensor(2.0), torch.tensor(4.0), torch.tensor(8.0)
    assert combine_losses(recon, clip, mmd, lambda_recon=1.0).item() == 2.0
    expected = 0.5 * 2.0 + 0.5 * (0.25 * 4.0 + 0.75 * 8.0)
    assert combine_losses(recon, clip, mmd, lambda_recon=0.5, beta_clip=0.25).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="1.5"):
        combine_losses(recon, clip, mmd, lambda_recon=1.5)


def test_reconstruction_loss_weights():
    pred, target = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    assert reconstruction_loss(pred, target).item() == 1.0
    assert reconstruction_loss(pred, target, torch.tensor([1.0, 0.0])).item() == 0.5


def test_adversarial_generator_term_does_not_train_the_discriminator():
    torch.manual_seed(0)
    disc = AlignmentDiscriminator(8, hidden_dim=16)
    graph = torch.randn(4, 8, requires_grad=True)
    d_loss, g_loss = adversarial_losses(disc, graph, torch.randn(4, 8))
    g_loss.backward()
    assert graph.grad is not None and graph.grad.abs().sum() > 0
    assert all(p.grad is None for p in disc.parameters())
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
