import warnings

import pytest
import torch

# The suite's models are small: one intra-op thread is as fast as two and does not spin-wait when CI's
# two cores are shared.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _quiet_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)
        yield
