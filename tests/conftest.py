"""Suite-wide settings: one torch thread (the test models are tiny, and a second thread only
adds contention on a 2-core CI machine)."""

import torch

torch.set_num_threads(1)
