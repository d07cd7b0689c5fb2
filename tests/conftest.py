"""Settings shared by every test."""

import torch

# The tests run tiny tensors on small shared machines, where several intra-op
# threads cost far more in synchronisation than they gain.
torch.set_num_threads(1)
