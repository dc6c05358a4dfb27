import os
import random

import pytest
import torch

# Fresh random data on every run (DESIGN §7), and the seed of a failing test in its report, so that
# `PACKED_VIT_TEST_SEED=<seed> pytest <test>` draws the very same data again.
SEED_VARIABLE = "PACKED_VIT_TEST_SEED"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = int(os.environ.get(SEED_VARIABLE) or random.randrange(2**31))
    request.node.user_properties.append(("seed", seed))
    torch.manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.failed:
        seed = dict(item.user_properties).get("seed")
        if seed is not None:
            report.sections.append(("random seed", f"reproduce with {SEED_VARIABLE}={seed} pytest {item.nodeid}"))
