"""--compile (torch.compile per decoder layer) against eager: per-step losses within 1e-4 relative (fp32,
CPU inductor kernels reorder reductions), and the adapter within 1e-3 relative / 1e-5 absolute."""

import pytest
import torch

from helpers import adapter_weights, train

pytestmark = pytest.mark.slow


def test_compiled_layers_match_eager(config_for, tmp_path):
    settings = {"train.max_steps": 3, "train.batch_size": 2}
    eager = train(config_for(**settings, **{"output.dir": str(tmp_path / "eager")}))
    compiled = train(config_for(**settings, **{"output.dir": str(tmp_path / "compiled"), "model.compile": "on"}))
    torch.testing.assert_close(torch.tensor(compiled.losses), torch.tensor(eager.losses), rtol=1e-4, atol=0)
    left, right = adapter_weights(tmp_path / "compiled"), adapter_weights(tmp_path / "eager")
    for key in right:
        torch.testing.assert_close(left[key], right[key], rtol=1e-3, atol=1e-5)
