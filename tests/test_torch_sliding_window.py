"""The PyTorch device-blending sliding window against the NumPy reference."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sliding_window_oracle import sliding_window_probs  # noqa: E402

from experiments.torch_sliding_window import torch_sliding_window  # noqa: E402


def _network():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv3d(4, 3, 3, padding=1))
    return lambda x: torch.softmax(net(x), 1)


@pytest.mark.parametrize("shape,window,batch", [((20, 24, 28), (8, 16, 16), 2),  # leftover batch of 1
                                                 ((5, 30, 12), (8, 16, 16), 3),  # padded on two axes
                                                 ((16, 16, 16), (8, 8, 8), 4)])
def test_torch_blending_matches_the_numpy_reference(shape, window, batch):
    image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    predict = _network()

    def numpy_predict(x):  # (N, D, H, W, 1) -> (N, D, H, W, K), the reference's layout
        with torch.no_grad():
            return predict(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()

    expected = sliding_window_probs(image, numpy_predict, window, 0.5, batch)
    probs = torch_sliding_window(image, predict, window, 0.5, batch, output="probs")
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)
    labels = torch_sliding_window(image, predict, window, 0.5, batch)
    assert labels.dtype == np.uint8 and labels.shape == shape
    np.testing.assert_array_equal(labels, expected.argmax(-1))


def test_bad_output_and_rank_are_refused():
    with pytest.raises(ValueError, match="output"):
        torch_sliding_window(np.zeros((8, 8, 8), np.float32), _network(), (8, 8, 8), output="logits")
    with pytest.raises(ValueError, match="D, H, W"):
        torch_sliding_window(np.zeros((8, 8), np.float32), _network(), (8, 8, 8))
