import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import pytest
import torch

torch.set_num_threads(1)  # the test models are tiny: threads only add overhead on a shared 2-core machine
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (contract_cases) import by name


@pytest.fixture
def one_thread():
    """One torch thread for the test, restored after (a training run sets train.num_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
