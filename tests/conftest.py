import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random data for every test, but reproducible from the test's name when one fails.
    torch.manual_seed(hash(request.node.nodeid) % 2**31)
