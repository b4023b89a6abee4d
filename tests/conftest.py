import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
import torch

torch.set_num_threads(1)  # the test models are tiny: threads only add overhead on a shared 2-core machine
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (contract_cases) import by name
