import torch

import bnorm


def test_batchnorm2d_matches_torch_forward_in_training():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    ours, theirs = bnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
